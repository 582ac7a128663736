"""Old import path of two tables, kept only for streams.embedded_log until it imports `storage.embedded`
(its owner changes that line); every table lives in `storage`. Import nothing else from here."""

from storage.embedded import EmbeddedLogHead, EmbeddedLogRecord

log_records = EmbeddedLogRecord.__table__
log_partition_heads = EmbeddedLogHead.__table__
