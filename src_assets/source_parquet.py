"""Parquet source files: read one row group at a time, each validated as it comes."""

from __future__ import annotations

import io

import polars as pl

from .source_data import (
    MAX_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_TEXT_CHARS,
    ImageResolver,
    SourceDataError,
    SourceOptions,
    no_image_files,
    quoted,
    read_chunks,
)


def read_parquet_source(
    file,
    name: str,
    size: int | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_text_chars: int = MAX_TEXT_CHARS,
    options: SourceOptions | None = None,
    resolve: ImageResolver = no_image_files,
) -> pl.DataFrame:
    """Parses and validates one Parquet file (bytes or an open binary file), one row group at a time, so that a bad
    row stops the read where it is; ``name`` (its URI) is used in errors. A file over ``max_bytes`` is refused
    unread, and so is a row group whose footer says it inflates to more than ``max_bytes``."""
    import pyarrow.parquet as pq

    options = options or SourceOptions(
        max_bytes=max_bytes, max_image_pixels=max_image_pixels, max_text_chars=max_text_chars
    )
    if isinstance(file, bytes):
        size, file = len(file), io.BytesIO(file)
    if size is not None and size > options.max_bytes:
        raise SourceDataError(
            f"{name}: the file is {size} bytes, over the cap of {options.max_bytes} (max_source_file_bytes)"
        )
    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:
        raise SourceDataError(f"{name}: not a readable Parquet file ({quoted(str(e))})") from e

    def row_groups():
        for group in range(parquet.num_row_groups):
            inflated = parquet.metadata.row_group(group).total_byte_size
            if inflated > options.max_bytes:
                raise SourceDataError(
                    f"{name}: row group {group} inflates to {inflated} bytes, over the cap of {options.max_bytes} "
                    f"(max_source_file_bytes)"
                )
            try:
                yield pl.from_arrow(parquet.read_row_group(group))
            except Exception as e:
                raise SourceDataError(f"{name}: row group {group} is not readable ({quoted(str(e))})") from e

    return read_chunks(row_groups(), name, options, resolve, empty=parquet.schema_arrow.empty_table())
