"""herd: run Meta's Llama 4 on your own Ray cluster. This package holds only the `herd` command line."""
