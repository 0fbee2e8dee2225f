"""The built-in `csv-sql` importer: a CSV's rows into a SQL table, failed rows set aside.

Kofa's split: the rows that pass validation and the database are committed in one
transaction; the others go to `<stem>.pending<suffix>` with an `import_error` column,
ready to be fixed and dropped again. The job id is the idempotency key: the same
transaction records the job in `filedock_imports` (and its failed lines in
`filedock_import_errors`), so a re-run after a crash either finds no record and imports,
or finds it and only writes the output files again, from the recorded errors.

Memory does not grow with the file: the CSV is read a chunk of `chunk_rows` records at a
time, each chunk is validated column by column and written with one `executemany` or
`COPY`, and the output files are written as rows are decided.
"""

from service.importers.csv_sql.importer import CsvSqlImporter
from service.importers.csv_sql.plan import ERROR_COLUMN

# private helpers the tests exercise directly
from service.importers.csv_sql.values import _CellError as _CellError
from service.importers.csv_sql.values import _converter as _converter
from service.importers.csv_sql.values import _fast_path as _fast_path

__all__ = ["ERROR_COLUMN", "CsvSqlImporter"]
