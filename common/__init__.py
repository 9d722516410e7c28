"""What every area shares: user errors and their one-line messages (`errors`), and S3 URLs (`s3url`).

This package imports nothing from herd's areas (llama4, cluster, serving, finetune, licensing) or from the
`herd` command line, so any of them may import it.
"""
