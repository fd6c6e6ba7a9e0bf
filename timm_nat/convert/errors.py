"""The converter's expected failures and how they are shown: one line each."""

__all__ = ['ConversionError', 'DownloadError', 'log', 'one_line']


class ConversionError(Exception):
    """An expected failure; the command line prints its message on one line and exits non-zero."""


class DownloadError(ConversionError):
    """A source that could not be downloaded (offline, unreachable, not found)."""


def log(message: str) -> None:
    """Default progress output: stdout, flushed (long batches are watched live)."""
    print(message, flush=True)


def one_line(text: object, limit: int = 600) -> str:
    """``text`` with its whitespace collapsed to single spaces, cut to ``limit`` characters."""
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'
