"""The one exception type the lower layers raise; the CLI turns it into a one-line message."""


class NMSparseError(Exception):
    """An error whose message is fit to show a user as is: it names the file/layer/value and what to do."""
