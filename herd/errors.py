"""The command line's error type, which lives in `common.errors` so that every area can raise it."""
from common.errors import UserError

__all__ = ["UserError"]
