"""JourneyDB's images as a ``datasets`` imagefolder: ``metadata.jsonl`` in the image root, one row a record.

``datasets.load_dataset("imagefolder", data_dir=ROOT)`` reads the rows ``{"file_name": ..., "text": ...}``
as an ``image`` column (the file, decoded) and a ``text`` column.

How a record's image is found: its ``img_path`` ("./000/0a1b....jpg" in JourneyDB's
``train_anno_realease_repath.jsonl``) is a path relative to the folder the image shards were unpacked
into (``data/train/imgs/000.tgz`` -> ``imgs/000/...``), which is the image root. The leading ``./`` is
dropped, backslashes are read as ``/`` and the path is normalized; that relative path is the row's
``file_name`` (imagefolder resolves it against the metadata file's folder, i.e. the root). An absolute
path, a URL, or one that climbs out of the root with ``..`` is not used (imagefolder refuses them too).
"""

import json
import os
import posixpath

from yoso.data.journeydb.report import MAX_LISTED_PROBLEMS

METADATA_FILE_NAME = "metadata.jsonl"
DEFAULT_IMAGE_COLUMN = "file_name"
DEFAULT_CAPTION_COLUMN = "text"


def image_file_name(img_path):
    """``img_path`` as a normalized path relative to the image root, or None when it cannot be one."""
    if type(img_path) is not str or "://" in img_path:
        return None
    path = posixpath.normpath(img_path.strip().replace("\\", "/"))
    if path in ("", ".", "..") or path.startswith(("/", "../")) or (len(path) > 1 and path[1] == ":"):
        return None  # empty, absolute (also "C:/..."), or outside the root
    return path


def column_name_problem(image_column_name, caption_column_name):
    """Why these metadata column names would not load as an imagefolder, or None when they do."""
    if image_column_name != "file_name" and not image_column_name.endswith("_file_name"):
        return (f"--image_column_name {image_column_name}: imagefolder reads images only from a column named "
                "file_name or ending in _file_name (X_file_name loads as column X); use file_name")
    if not caption_column_name.strip():
        return "--caption_column_name is empty: give a column name such as text"
    if caption_column_name == "file_name" or caption_column_name.endswith(("_file_name", "file_names")):
        return (f"--caption_column_name {caption_column_name}: imagefolder would read that column as image files; "
                "use a name such as text")
    image_column = image_column_name[: -len("_file_name")] if image_column_name != "file_name" else "image"
    if caption_column_name == image_column:
        return (f"--caption_column_name {caption_column_name} is also the image column "
                f"(--image_column_name {image_column_name} loads as {image_column}); pick another name")
    return None


class ImageFolder:
    """Finds each record's image under ``root`` and counts the records whose image is not there."""

    def __init__(self, root, image_column_name=DEFAULT_IMAGE_COLUMN, caption_column_name=DEFAULT_CAPTION_COLUMN):
        self.root = os.fspath(root)
        self.metadata_file = os.path.join(self.root, METADATA_FILE_NAME)
        self.image_column_name = image_column_name
        self.caption_column_name = caption_column_name
        self.image_missing = 0
        self.image_missing_first = []  # the first few missing file names, for the summary
        self.no_img_path = 0

    def file_name_of(self, record):
        """The record's image path relative to the root if the file is there; None (counted) if not."""
        img_path = record.get("img_path") if type(record) is dict else None
        file_name = image_file_name(img_path)
        if file_name is None:
            self.no_img_path += 1
            return None
        if not os.path.isfile(os.path.join(self.root, file_name)):
            self.image_missing += 1
            if len(self.image_missing_first) < MAX_LISTED_PROBLEMS:
                self.image_missing_first.append(file_name)
            return None
        return file_name

    def metadata_line(self, caption, file_name):
        return json.dumps({self.image_column_name: file_name, self.caption_column_name: caption},
                          ensure_ascii=False) + "\n"

    def summary(self, rows):
        return {
            "image_root": self.root,
            "metadata_file": self.metadata_file,
            "image_column_name": self.image_column_name,
            "caption_column_name": self.caption_column_name,
            "rows": rows,
            "image_missing": {"count": self.image_missing, "first": self.image_missing_first},
            "no_img_path": self.no_img_path,
        }
