"""MNIST-format data sets (28x28 greyscale, 60k train / 10k test, four IDX files each).

Files are looked for in `data.root` (or its `<name>/` sub-folder) when it is set, and nowhere
else: a root that holds no copy is downloaded into, never silently replaced by another copy.
Without a root: ~/.cache/kdistill/data, then Debian's dataset package folder, then the
official mirror (with MD5 checks).
"""

from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from kdistill.data.download import fetch
from kdistill.data.idx import find_idx, read_idx
from kdistill.data.registry import DEFAULT_ROOT, DataRequest, LoadedData, register_dataset
from kdistill.data.sets import ImageSet
from kdistill.errors import KdistillError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class IdxSource:
    """Where one MNIST-format data set lives: local folders, mirror URL, and checksums of the .gz files."""

    name: str
    url: str
    md5: tuple[str, str, str, str]  # in FILES order, for the .gz files on the mirror
    system_dirs: tuple[Path, ...] = ()
    apt_package: str | None = None

    def load(self, request: DataRequest, classes: list[str]) -> LoadedData:
        directory = self._locate(request.root, request.download)
        paths = [find_idx(directory, f) for f in FILES]
        train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
        for images, labels, image_path, label_path in ((train_x, train_y, *paths[:2]), (test_x, test_y, *paths[2:])):
            if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
                raise KdistillError(f"{image_path} {list(images.shape)} and {label_path} {list(labels.shape)} are not "
                                    "matching [N, H, W] images and [N] labels; replace them with the original files")
        # IDX images are [N, H, W]; add the channel axis. Labels widen to int64 for loss functions.
        return LoadedData(ImageSet(train_x.unsqueeze(1), train_y.long()), ImageSet(test_x.unsqueeze(1), test_y.long()),
                          classes, sources=[str(p) for p in paths])

    def _locate(self, root: Path | None, download_ok: bool) -> Path:
        """The first folder holding all four files, downloading into root/<name>/ if none does."""
        looked = [root / self.name, root] if root else [DEFAULT_ROOT / self.name, DEFAULT_ROOT, *self.system_dirs]
        root = root or DEFAULT_ROOT
        for directory in looked:
            if all(find_idx(directory, f) for f in FILES):
                return directory

        target = root / self.name
        places = ", ".join(str(p) for p in looked)
        fix = f"put the four IDX files ({', '.join(FILES)}, optionally .gz) in {target}/"
        if self.apt_package:
            unset = " and leave data.root unset" if looked[0] != DEFAULT_ROOT / self.name else ""
            fix = f"install it with `apt-get install {self.apt_package}`{unset}, or {fix}"
        if not download_ok:
            raise KdistillError(f"{self.name}: not found in {places} and download is off; {fix}")
        try:
            for file, md5 in zip(FILES, self.md5, strict=True):
                if not find_idx(target, file):
                    fetch(f"{self.url}{file}.gz", target / f"{file}.gz", md5)
        except (OSError, HTTPException) as exc:  # URLError, timeouts, cut connections, unwritable target
            raise KdistillError(f"{self.name}: not found in {places} and download failed ({exc}); {fix}") from exc
        return target


FASHION_MNIST = IdxSource(
    name="fashion_mnist",
    url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    md5=("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    apt_package="dataset-fashion-mnist",
)
MNIST = IdxSource(
    name="mnist",
    url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    md5=("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
    system_dirs=(Path("/usr/share/datasets/mnist"),),
)
KMNIST = IdxSource(
    name="kmnist",
    url="http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
    md5=("bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
         "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"),
)


@register_dataset("fashion_mnist", "Fashion-MNIST: 28x28 greyscale clothing photos, 10 classes, 60k train / 10k test")
def load_fashion_mnist(request: DataRequest) -> LoadedData:
    return FASHION_MNIST.load(request, ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"])


@register_dataset("mnist", "MNIST: 28x28 greyscale handwritten digits, 10 classes, 60k train / 10k test")
def load_mnist(request: DataRequest) -> LoadedData:
    return MNIST.load(request, [str(d) for d in range(10)])


@register_dataset("kmnist", "Kuzushiji-MNIST: 28x28 greyscale cursive Japanese characters, 10 classes, 60k / 10k")
def load_kmnist(request: DataRequest) -> LoadedData:
    return KMNIST.load(request, ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"])
