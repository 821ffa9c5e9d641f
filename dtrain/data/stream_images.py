"""Images streamed through Ray Data (data.name=images, docs/streaming.md): a folder in the ImageFolder layout, one
subfolder per class (class ids: the sorted subfolder names), each image one row. What the driver learns from the
file listing and the images' headers alone: the classes, the rows (one per file), the input shape (C, H, W) of the
first image (or data.options size and mode), and images of another size. Ray Data's read_images decodes them
(PIL); dtrain.data.stream_batches.image_rows turns them into pixels in [0, 1] and class ids.
"""

from __future__ import annotations

from typing import Any

from dtrain.data.stream_source import SourceFiles, StreamSource, _source, check_streamable, open_location
from dtrain.errors import ConfigError, DataError, first_line

HEADER_CHECKS = 10_000
"""Images whose header the driver reads for their size (local files; on object storage the first one only): a
larger set's other images are checked as they stream."""
GRAY = ("1", "L", "LA", "I", "I;16", "F")
"""PIL modes read as one channel (mode L) unless data.options.mode says otherwise."""


def scan_images(location: str, key: str) -> SourceFiles:
    """The image files under the folder location, each in a class subfolder (one row each)."""
    filesystem, paths, root = open_location(location, key, "images")
    if root is None:
        raise ConfigError(f"{key}: {location}: expected a folder (or URI) with one subfolder of images per class")
    if not paths:
        raise DataError(f"{key}: {location} holds no image file (.png, .jpg, ...) in class subfolders")
    for path in paths:
        if "/" not in path[len(root) + 1:]:
            raise DataError(f"{key}: {path}: not in a class subfolder (expected {location}/<class>/<image>)")
    return SourceFiles(location, filesystem, paths, [1] * len(paths), None, "images", root)


def class_names(files: SourceFiles) -> list[str]:
    return sorted({p[len(files.root) + 1:].split("/", 1)[0] for p in files.paths})


def _header(files: SourceFiles, path: str, key: str) -> tuple[tuple[int, int], str]:
    """((width, height), PIL mode) from the image's header."""
    from PIL import Image

    try:
        with files.filesystem.open_input_file(path) as f, Image.open(f) as image:
            return image.size, image.mode
    except Exception as err:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, ...
        raise DataError(f"{key}: {path}: not a readable image ({first_line(err)[:120]})") from None


def _options(options: dict[str, Any]) -> tuple[tuple[int, int] | None, str | None]:
    unknown = sorted(set(options) - {"size", "mode"})
    if unknown:
        raise ConfigError(f"data.options.{unknown[0]}: unknown option for 'images' (allowed: size, mode)")
    size, mode = options.get("size"), options.get("mode")
    if size is not None and not (isinstance(size, list | tuple) and len(size) == 2
                                 and all(isinstance(s, int) and s >= 1 for s in size)):
        raise ConfigError(f"data.options.size: expected [height, width] (two integers >= 1), got {size!r}")
    if mode is not None and mode not in ("L", "RGB"):
        raise ConfigError(f"data.options.mode: expected L (gray) or RGB, got {mode!r}")
    return (tuple(size) if size is not None else None), mode


def _check_sizes(files: SourceFiles, key: str, first: str, size: tuple[int, int]) -> None:
    """An image of another (width, height) than the first one's: DataError naming the file (headers only)."""
    local = files.filesystem.type_name == "local"
    for path in files.paths[:HEADER_CHECKS if local else 1]:
        found, _ = _header(files, path, key)
        if found != size:
            raise DataError(f"{key}: {path} is {found[1]}x{found[0]} (H x W), {first} is {size[1]}x{size[0]}; set "
                            "data.options.size: [H, W] to resize every image")


def describe_images(cfg: Any) -> StreamSource:
    """data.name=images: check the folder from its listing and the images' headers; what a model needs to know."""
    from dtrain.models.base import DataMeta

    check_streamable(cfg)
    size, mode = _options(dict(cfg.options or {}))
    if cfg.features:
        raise ConfigError("data.features: not used by data.name=images (the features are the pixels)")
    train = scan_images(cfg.path, "data.path")
    classes = class_names(train)
    if len(classes) < 2 and cfg.target is not None:
        raise DataError(f"data.path: {cfg.path} has {len(classes)} class subfolder ({', '.join(classes)}); "
                        "expected one subfolder per class, at least 2")
    first_size, first_mode = _header(train, train.paths[0], "data.path")
    mode = mode or ("L" if first_mode in GRAY else "RGB")
    files: dict[str, SourceFiles | None] = {"train": train, "val": None, "test": None}
    for split in ("val", "test"):
        location = getattr(cfg, f"{split}_path")
        if location:
            files[split] = scan_images(location, f"data.{split}_path")
            unknown = sorted(set(class_names(files[split])) - set(classes))
            if unknown:
                raise DataError(f"data.{split}_path: class folder {unknown[0]!r} of {location} is not one of "
                                f"{cfg.path}'s ({', '.join(classes[:10])})")
    if size is None:
        for split, own in files.items():
            if own is not None:
                _check_sizes(own, "data.path" if split == "train" else f"data.{split}_path", train.paths[0],
                             first_size)
    height, width = size or (first_size[1], first_size[0])
    shape = (1 if mode == "L" else 3, height, width)
    target = "label" if cfg.target is not None else None
    meta = DataMeta(shape, num_classes=len(classes)) if target else DataMeta(shape, task="unsupervised")
    read = {"size": size, "mode": mode, "classes": classes, "shape": shape}
    return _source(cfg, files, ["pixels"], target, meta, "images", read)
