"""`npz`: your arrays in one NumPy .npz file (x_train, y_train, x_test, y_test, optional class_names).

Images are uint8, [N, H, W] (greyscale), [N, H, W, C] or [N, C, H, W] with C = 1 or 3. When
both readings fit (e.g. [N, 3, 32, 3]), channels-first wins. The file is loaded with
`allow_pickle=False`: an object array (which would be unpickled) is refused.
"""

from pathlib import Path

import numpy as np
import torch

from kdistill.data.registry import DataRequest, LoadedData, register_dataset
from kdistill.data.sets import ImageSet
from kdistill.errors import KdistillError

ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def find_npz(root: Path | None) -> Path:
    if root is None:
        raise KdistillError("data set 'npz' needs data.root: the path of your .npz file (or of a folder holding one)")
    if root.is_file():
        return root
    found = sorted(root.glob("*.npz"))
    if len(found) != 1:
        what = "no .npz file" if not found else f"{len(found)} .npz files ({', '.join(p.name for p in found)})"
        raise KdistillError(f"data.root {root} holds {what}; point data.root at the .npz file to use")
    return found[0]


def _images(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise KdistillError(f"{path}: {key} is {x.dtype}, not uint8; save the images as uint8 pixels 0..255")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        pass  # [N, C, H, W]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # [N, H, W, C]
    else:
        raise KdistillError(f"{path}: {key} has shape {list(x.shape)}; expected [N, H, W], [N, H, W, C] or "
                            "[N, C, H, W] with C = 1 or 3")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> torch.Tensor:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise KdistillError(f"{path}: {key} must be a 1-D array of integer labels, got {y.dtype} {list(y.shape)}")
    if len(y) != n:
        raise KdistillError(f"{path}: {key} holds {len(y)} labels but its images number {n}; they must match")
    if len(y) and y.min() < 0:
        raise KdistillError(f"{path}: {key} holds a negative label ({y.min()}); labels are 0..K-1")
    return torch.from_numpy(y.astype(np.int64))


@register_dataset("npz", "your arrays in one .npz file (data.root): x_train, y_train, x_test, y_test, class_names")
def load_npz(request: DataRequest) -> LoadedData:
    path = find_npz(request.root)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ARRAYS if key not in archive.files]
            if missing:
                held = ", ".join(archive.files) or "nothing"
                raise KdistillError(f"{path} lacks {', '.join(missing)}; it holds {held} (expected "
                                    f"{', '.join(ARRAYS)} and optionally class_names)")
            arrays = {key: archive[key] for key in (*ARRAYS, "class_names") if key in archive.files}
    except KdistillError:
        raise
    except ValueError as error:  # what allow_pickle=False raises for an object array
        raise KdistillError(f"{path} holds Python objects (pickled arrays), which kdistill never loads; save plain "
                            f"numeric arrays ({error})") from None
    except Exception as error:  # not a zip, truncated, ...
        raise KdistillError(f"{path} is not a readable .npz file ({type(error).__name__}: {error})") from None

    splits = {}
    for split in ("train", "test"):
        images = _images(arrays[f"x_{split}"], path, f"x_{split}")
        splits[split] = ImageSet(images, _labels(arrays[f"y_{split}"], len(images), path, f"y_{split}"))
    top = max(int(s.labels.max()) for s in splits.values() if len(s)) if any(len(s) for s in splits.values()) else 0
    if "class_names" in arrays:
        names = [str(name) for name in arrays["class_names"].reshape(-1)]
        if top >= len(names):
            raise KdistillError(f"{path}: label {top} is out of range for the {len(names)} class_names")
    else:
        names = [str(k) for k in range(top + 1)]
    return LoadedData(splits["train"], splits["test"], names, sources=[str(path)])
