"""Training throughput: kdistill's loop against a plain PyTorch DataLoader loop (the seed's style).

Same data (Fashion-MNIST train split), batch size, optimizer and number of samples. Variants:
  plain/seed-model      seed 000's loop: Dataset + DataLoader with per-sample ToTensor/Normalize,
                        the seed's own model code (NCHW)
  plain/kdistill-model  the same plain loop over kdistill's seed_student (channels-last inside)
  kdistill              kdistill.train.fit with BatchLoader (batches sliced from memory)
  kdistill/bf16         the same with train.precision=bf16
  .../compile           the same with train.compile=true (steady state: the warm-up round compiles)
  kdistill/aug-crop-flip   kdistill with crop after 2 pixels of padding and flips (`--augment`)
  kdistill/aug-all         kdistill with resized crop, flips, colour jitter, cutout and mixup (`--augment`)
Prints samples/s (median over interleaved rounds of one epoch each) and ratios; with `--augment`,
also each augmentation's cost: the extra seconds of an augmented epoch over a plain one.

    make bench-throughput      # or: python -m benchmarks.throughput --rounds 5
    python -m benchmarks.throughput --device cuda   # on a GPU: the plain loop copies pinned batches,
                                                    # kdistill keeps the data on the device
    python -m benchmarks.throughput --model resnet --model-kwargs '{"width": 32, "depth": 2}'  # the teacher
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks.timing import check_environment, interleaved, median
from kdistill.config import train_config
from kdistill.data import Augment, BatchLoader, load_data
from kdistill.distill import Distiller
from kdistill.losses import cross_entropy_objective
from kdistill.models import create_model
from kdistill.train import Progress, fit
from kdistill.train.devices import synchronize


class SeedStudent(nn.Module):
    """Seed 000's StudentModel, verbatim in structure and memory format."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class PerSampleDataset(Dataset):
    """What torchvision's MNIST + ToTensor + Normalize does: one sample at a time in Python."""

    def __init__(self, images, labels, mean, std):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div(255)
        return (x - self.mean) / self.std, int(self.labels[i])


def plain_epoch(model, loader, device: torch.device) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    samples = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        samples += labels.shape[0]
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=20_000, help="training samples per measured epoch")
    parser.add_argument("--model", default="seed_student",
                        help="the model of every variant but plain/seed-model (run only for seed_student), e.g. resnet")
    parser.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"width": 32, "depth": 2}\'')
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (the plain loop copies pinned batches)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the train.compile variants")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="kdistill variants to time (bf16 is slow on CPUs without AVX-512 BF16 or AMX)")
    parser.add_argument("--augment", action="store_true", help="also time fp32 training with augmentations")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = load_data("fashion_mnist")
    train = data.train
    subset = type(train)(train.images[: args.samples], train.labels[: args.samples])
    mean, std = data.mean[0], data.std[0]
    gpu = device.type == "cuda"
    plain_loader = DataLoader(PerSampleDataset(subset.images, subset.labels, mean, std),
                              batch_size=args.batch_size, shuffle=True, pin_memory=gpu,
                              num_workers=4 if gpu else 0, persistent_workers=gpu)
    batch_loader = BatchLoader(subset, args.batch_size, mean=data.mean, std=data.std, shuffle=True, device=device)
    quiet = Progress("quiet")

    def make_model() -> nn.Module:
        return create_model(args.model, data.input_shape, data.num_classes, **json.loads(args.model_kwargs))

    def kdistill_epoch(precision: str, compile: bool = False, loader=batch_loader):
        """The second epoch of a two-epoch fit: steady state (the first one compiles, with compile)."""
        model = make_model()
        cfg = train_config(epochs=2, batch_size=args.batch_size, optimizer="adam", lr=0.01, precision=precision,
                           compile=compile)
        distiller = Distiller(None, model, cross_entropy_objective(), device=device)
        return fit(distiller, loader, cfg, progress=quiet).history[-1]["epoch_seconds"]

    def timed_plain(make_model):
        model = make_model().to(device)
        synchronize(device)
        started = time.perf_counter()
        plain_epoch(model, plain_loader, device)
        synchronize(device)
        return time.perf_counter() - started

    variants = {"plain/seed-model": lambda: timed_plain(SeedStudent)} if args.model == "seed_student" else {}
    variants["plain/kdistill-model"] = lambda: timed_plain(make_model)
    for precision in args.precisions:
        name = "kdistill" if precision == "fp32" else f"kdistill/{precision}"
        variants[name] = lambda p=precision: kdistill_epoch(p)
        if not args.no_compile:
            variants[f"{name}/compile"] = lambda p=precision: kdistill_epoch(p, compile=True)
    augments = {
        "kdistill/aug-crop-flip": Augment(crop_padding=2, hflip=True),
        "kdistill/aug-all": Augment(resized_crop=(0.35, 1.0), hflip=True, color_jitter=0.4, cutout=8, mixup=0.2),
    } if args.augment else {}
    loaders = {"none": batch_loader}
    for name, augment in augments.items():
        loaders[name] = BatchLoader(subset, args.batch_size, mean=data.mean, std=data.std, shuffle=True,
                                    device=device, augment=augment, num_classes=data.num_classes)
        variants[name] = lambda a=loaders[name]: kdistill_epoch("fp32", loader=a)
    print(check_environment(), f"device {device}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    warmup = interleaved(variants, 1)  # not counted: compiles, fills caches
    print("warm-up round (s):", {name: round(t[0], 1) for name, t in warmup.items()})
    times = interleaved(variants, args.rounds)
    rate = {name: args.samples / median(t) for name, t in times.items()}
    reference = rate.get("plain/seed-model", rate["plain/kdistill-model"])
    print(f"{'variant':<22} {'samples/s':>10} {'x plain loop':>12}")
    for name, value in rate.items():
        print(f"{name:<22} {value:>10.0f} {value / reference:>12.2f}")
    if augments:
        # Batches alone, without a model: the augmentation's own time, free of the training step's noise.
        def batches(loader):
            def epoch():
                for _ in loader:
                    pass
                synchronize(device)
            return epoch

        alone = interleaved({name: batches(loader) for name, loader in loaders.items()}, args.rounds)
        step = args.samples / rate["kdistill"] / len(batch_loader)
        for name in augments:
            extra = (median(alone[name]) - median(alone["none"])) / len(batch_loader)
            print(f"{name}: {1000 * extra:.2f} ms of augmentation per batch = {100 * extra / step:.1f} % of a "
                  f"{1000 * step:.1f} ms training step (epochs: {100 * (rate['kdistill'] / rate[name] - 1):+.1f} %)")
    print(json.dumps({"samples_per_second": rate, "rounds": args.rounds, "samples": args.samples,
                      "device": str(device), "model": args.model}))


if __name__ == "__main__":
    main()
