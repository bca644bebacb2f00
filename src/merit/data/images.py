"""The images of image-text datasets: every one present and readable before any long work."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from merit.data.formats import DataError

if TYPE_CHECKING:
    from merit.data.mixture import MixtureDataset


def check_images(dataset: MixtureDataset) -> str:
    """Open the header of every image the run may read (the examples of every split); return
    a digest of their paths and sizes ("" without images): part of the dataset's sha256, so an
    image replaced by another of another size is new data (hashing every image's bytes would
    read the whole image collection on every command).

    Raises:
        DataError: one line naming the dataset, the record and the path of the first image
            that is missing or that PIL cannot read.
    """
    from PIL import Image, UnidentifiedImageError

    used = sorted({i for idx in dataset.splits.values() for i in idx})
    seen = hashlib.sha256()
    checked = 0
    for i in used:
        for path in dataset.data.examples[i].images:
            where = f"{dataset.name}: record {i}: image {path}"
            try:
                with Image.open(path) as img:
                    img.size  # noqa: B018 - reading the header is the check
            except FileNotFoundError:
                raise DataError(f"{where} is missing") from None
            except (UnidentifiedImageError, OSError) as err:
                why = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise DataError(f"{where} is unreadable ({why})") from None
            seen.update(f"{i}:{path}:{os.path.getsize(path)}\n".encode())
            checked += 1
    return seen.hexdigest() if checked else ""
