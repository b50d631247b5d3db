"""The configuration schema: dataclasses that OmegaConf turns into a typed, strict config.

A recipe (YAML) is merged onto these defaults, then `key=value` overrides from the command
line; OmegaConf rejects unknown keys and wrong types, `validate` (in loading.py) rejects
out-of-range values (the bounds are there). Every field here is a key a user can set.

A field's help, shown by `kdistill config`, is its trailing comment, or else the comment lines
just above it: keep it to one short line. Comment lines above a field that has a trailing comment
are for readers of this file only.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class AugmentConfig:
    """Batch augmentations on the training device (kdistill.data.Augment); all off by default."""

    resized_crop: Optional[List[float]] = None  # random resized crop: [min, max] area fraction, e.g. [0.35, 1]
    crop_padding: int = 0  # random crop after zero-padding this many pixels per side; 0 = off
    hflip: bool = False  # random horizontal flip (fine for clothes, wrong for digits)
    vflip: bool = False  # random vertical flip
    color_jitter: float = 0.0  # brightness, contrast, saturation each scaled by a factor in [1 - s, 1 + s]; 0 = off
    cutout: int = 0  # zero a square of this side in pixels at a random centre (DeVries & Taylor 2017); 0 = off
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha) blend (Zhang et al. 2018); 0 = off
    cutmix: float = 0.0  # alpha of cutmix's Beta blend (Yun et al. 2019); 0 = off; with mixup, one per batch


@dataclass
class UnlabelledConfig:
    """Another data set's images, added to the distilled student's training set without their labels."""

    name: Optional[str] = None  # a registered data set whose train and val images join the pool; null = none
    root: Optional[str] = None  # its data.root (null = the default places)
    max_size: Optional[int] = None  # take at most this many of its images (a fixed seeded choice); null = all


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # a registered data set (`kdistill list datasets`)
    # Nothing is read from anywhere else when root is set: no silent fall-back to another copy.
    root: Optional[str] = None  # the data's folder (a file for npz); null = ~/.cache/kdistill/data, then system copies
    val_size: Any = 0.1  # validation images carved from the training set: a count, or a fraction (at most max_val_size)
    max_val_size: Optional[int] = 5000  # cap on a fractional val_size; null = no cap
    test_size: Any = 0.2  # for data without a test split (image_folder): a count or a fraction, fixed seed
    split_seed: int = 0  # seed of the validation carving; fixed so every run sees the same split
    download: bool = True  # may a missing data set be downloaded (with checksums)?
    channels: Optional[int] = None  # 1 (greyscale) or 3 (RGB); null = as stored
    image_size: Optional[int] = None  # resize images to this square side in pixels; null = as stored
    # the rest of the training split joins the unlabelled pool, its labels withheld (a fixed choice, split_seed):
    # the teacher and the baseline train on the labelled part, the distilled student on both
    labelled_fraction: float = 1.0  # share of the training split that keeps its labels, in (0, 1]
    unlabelled: UnlabelledConfig = field(default_factory=UnlabelledConfig)  # more images for the unlabelled pool
    # auto: when the images take under a quarter of the device's free memory.
    on_device: Any = "auto"  # keep the uint8 images on the training device (no copy per step) | auto | false


@dataclass
class TrainConfig:
    epochs: int = 5  # passes over the training split; the best validation epoch is kept
    batch_size: int = 128  # the global batch (split across processes under torchrun)
    optimizer: str = "adam"  # sgd | adam | adamw
    lr: float = 0.01  # peak learning rate
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0  # L2 penalty (decoupled for adamw)
    schedule: str = "none"  # none | cosine | step | multistep (per optimisation step)
    step_epochs: int = 30  # step schedule: multiply lr by step_gamma every step_epochs
    milestones: List[int] = field(default_factory=list)  # multistep schedule: multiply lr by step_gamma at these epochs
    step_gamma: float = 0.1  # step and multistep schedules: the factor applied at each decay
    warmup_epochs: float = 0.0  # linear warm-up, in epochs
    grad_clip: Optional[float] = None  # max global gradient norm; null = no clipping
    label_smoothing: float = 0.0  # for the cross-entropy of plain (teacher / baseline) training
    ema_decay: Optional[float] = None  # validate, select and keep an average of the weights (e.g. 0.999); null = off
    precision: str = "fp32"  # fp32 | bf16 (autocast on CPU and CUDA) | fp16 (CUDA, with a gradient scaler)
    compile: bool = False  # torch.compile the student (and the teacher's inference); falls back to eager
    log_every_steps: int = 50  # read the running loss back from the device this often (a host sync)
    checkpoint_every_steps: Optional[int] = None  # also save a resumable state mid-epoch; null = per epoch only
    early_stop_patience: Optional[int] = None  # stop after this many epochs without a better val accuracy
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # of this model's training batches


@dataclass
class ModelConfig:
    """The student's keys; it is always trained, so it has no `checkpoint` (the teacher does)."""

    name: str = "seed_student"  # a registered model (`kdistill list models`) or module.path:ClassName
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the model's builder


@dataclass
class TeacherConfig(ModelConfig):
    name: str = "seed_teacher"  # a registered model (`kdistill list models`) or module.path:ClassName
    checkpoint: Optional[str] = None  # a .safetensors file to load instead of training
    train: TrainConfig = field(default_factory=TrainConfig)  # how the teacher is trained (when no checkpoint)


@dataclass
class PseudoLabelConfig:
    """Which unlabelled samples the student learns from, judged by the teacher's outputs (seed 002)."""

    min_confidence: float = 0.0  # drop pool samples whose teacher's top class probability (T = 1) is below this
    balance: bool = False  # keep as many pool samples per pseudo-class as the rarest has (the most confident)


@dataclass
class DistillConfig:
    """The objective is sum(w_i * term_i), divided by sum(w_i) when normalize_weights is true.

    `losses` defaults to empty (then filled with seed 000's ce 0.5 + kd 0.5) because a recipe merges
    into this map key by key: a non-empty default could only be added to, never replaced.
    """

    temperature: float = 4.0  # default T of every term that uses one
    # loss terms, {label: {type, weight, ...params}}; type defaults to the label; `label: null` drops a term
    losses: Dict[str, Any] = field(default_factory=dict)
    normalize_weights: bool = False  # divide the objective by the sum of the weights
    # auto: cached without augmentation, cached_views with per-sample augmentation, live with mixup,
    # cutmix or tapped teacher features; cached needs unaugmented inputs, cached_views augmented ones.
    teacher_signal: str = "auto"  # where the student's targets come from: auto | live | cached | cached_views
    views: int = 8  # cached_views: the teacher's logits are stored for this many augmented views of each sample
    # cached signals with many classes: store each row's top_k logits and the total mass of the rest
    # (T = 1 probabilities of those k exact, the rest spread evenly); 0 = every logit
    top_k: int = 0
    cache_dir: Optional[str] = None  # null = $KDISTILL_CACHE_DIR or ~/.cache/kdistill/soft_labels
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)  # filtering of the unlabelled pool


@dataclass
class ListedModel:
    """A model in a scheme's list (peers, teachers, assistants)."""

    name: str = "seed_student"  # a registered model (`kdistill list models`) or module.path:ClassName
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the model's builder
    checkpoint: Optional[str] = None  # multi_teacher: a .safetensors file to load instead of training


@dataclass
class OnlineConfig:
    # mutual: the student and its peers learn from each other's outputs (Zhang et al. 2018); teacher: the
    # recipe's teacher trains alongside on the labels and the student learns from it live
    mode: str = "mutual"  # mutual | teacher
    peers: List[ListedModel] = field(default_factory=list)  # mutual: the student's peers; [] = one copy of it


@dataclass
class SelfDistillConfig:
    # born_again: generations of the student, each taught by the one before (Furlanello et al. 2018); exits:
    # classifiers on shallow stages taught by the deepest output (Zhang et al. 2019, Be Your Own Teacher)
    mode: str = "born_again"  # born_again | exits
    generations: int = 2  # born_again: generations after the first, each taught by the one before
    exits: List[str] = field(default_factory=list)  # exits: tap paths of shallow stages that get a classifier
    deepest: Optional[str] = None  # exits: the deepest feature's tap; null = the input of the last Linear layer
    alpha: float = 0.1  # exits: each exit's (1 - alpha) * CE + alpha * KD from the deepest output
    temperature: float = 3.0  # exits: the KD temperature
    feature_weight: float = 1.28e-4  # exits: weight of the feature term (per-sample sum of squares)


@dataclass
class MultiTeacherConfig:
    # the teachers, each loaded from its checkpoint or trained with teacher.train (teacher k with seed + k - 1)
    teachers: List[ListedModel] = field(default_factory=list)
    # how their softened outputs become one target: mean | weights (fixed) | confidence (per sample: lower
    # entropy weighs more)
    combine: str = "mean"
    weights: List[float] = field(default_factory=list)  # combine=weights: one per teacher


@dataclass
class AssistantConfig:
    # teacher -> these assistants, in order -> student; each link an ordinary distillation run
    chain: List[ListedModel] = field(default_factory=list)


@dataclass
class NoisyStudentConfig:
    rounds: int = 2  # teacher -> round 1's student -> round 2's ...: each round's student teaches the next
    # each round's student, equal to or larger than its teacher; [] = the recipe's student in every round
    students: List[ListedModel] = field(default_factory=list)
    # model arguments merged into every round's student, its noise besides train.augment: e.g. {drop_path: 0.2,
    # dropout: 0.5} for resnet
    noise: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    batch_size: int = 1000  # batch of the test and validation passes
    latency_batches: List[int] = field(default_factory=lambda: [1, 256])  # batch sizes timed
    latency_repeats: int = 30  # timed rounds per model and batch size (the median is reported)


def _finetune_defaults() -> TrainConfig:
    return TrainConfig(epochs=5, lr=0.001, schedule="cosine")


@dataclass
class CompressConfig:
    """The distilled student made smaller and faster (`kdistill compress`; `kdistill run` ends with it when a
    step is set). Every model made is a deployable folder in <run>/compressed/, measured beside the others."""

    # applied in turn, each fine-tuned with distillation: unstructured:S (global magnitude), channels:S (the same
    # share S of every layer's channels removed), channels_global:S (channels ranked across layers)
    prune: List[str] = field(default_factory=list)
    # what the first pruning starts from: student (the distilled one) | teacher (prune then distil, as Minitron)
    source: str = "student"
    teacher: str = "student"  # who teaches each fine-tuning: student (the unpruned distilled one) | teacher
    # the fine-tuning objective, as distill.losses; {} = ce 0.1 + kd 0.9
    losses: Dict[str, Any] = field(default_factory=dict)
    temperature: float = 4.0  # default T of the fine-tuning's terms
    finetune: TrainConfig = field(default_factory=_finetune_defaults)  # the fine-tuning after each pruning
    # int8 versions, run in onnxruntime: static (calibrated) | dynamic | qat (quantisation-aware training of each
    # student, with the fine-tuning's distillation objective and teacher)
    quantize: List[str] = field(default_factory=list)
    export: bool = False  # ONNX files of every model (quantize implies it), checked in onnxruntime
    opset: int = 18  # the ONNX opset
    calibration_images: int = 1000  # training images that calibrate static int8 (a fixed seeded choice)
    latency_repeats: int = 50  # timed rounds per model, runtime and batch size (median and 90th percentile)


@dataclass
class RunConfig:
    name: str = "run"  # the run folder is <out_dir>/<name>
    # how teachers and students are arranged (`kdistill list schemes`)
    scheme: str = "offline"  # offline | online | self | multi_teacher | assistant | noisy_student
    out_dir: str = "runs"  # where run folders are made
    seed: int = 0  # fixes model init, shuffling, augmentation and dropout
    threads: Optional[int] = None  # torch intra-op threads; null = PyTorch's default
    device: str = "auto"  # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps; torchrun: cuda:LOCAL_RANK
    data: DataConfig = field(default_factory=DataConfig)  # what to train and test on
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the large model, trained or loaded
    student: ModelConfig = field(default_factory=ModelConfig)  # the small model, trained from scratch and distilled
    train: TrainConfig = field(default_factory=TrainConfig)  # student and baseline training
    distill: DistillConfig = field(default_factory=DistillConfig)  # the student's objective
    eval: EvalConfig = field(default_factory=EvalConfig)  # the final test-set evaluation and latency
    online: OnlineConfig = field(default_factory=OnlineConfig)  # scheme online
    self_distill: SelfDistillConfig = field(default_factory=SelfDistillConfig)  # scheme self
    multi_teacher: MultiTeacherConfig = field(default_factory=MultiTeacherConfig)  # scheme multi_teacher
    assistant: AssistantConfig = field(default_factory=AssistantConfig)  # scheme assistant
    noisy_student: NoisyStudentConfig = field(default_factory=NoisyStudentConfig)  # scheme noisy_student
    compress: CompressConfig = field(default_factory=CompressConfig)  # pruning, int8 and export of the student
