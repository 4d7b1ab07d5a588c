"""nbdfs: the exports of an NBD server as regular files, through FUSE."""

__version__ = "0.1.0"
