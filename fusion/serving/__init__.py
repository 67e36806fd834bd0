"""Putting the champion to work: the HTTP endpoint that follows the alias (``fusion serve``)
and batch fusion of folders or S3 prefixes on the Ray cluster (``fusion fuse --ray``)."""
