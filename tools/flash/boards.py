"""Board profiles for `pqsu flash`: what a board runs, pinned, and how hard it may work.

A profile is data only (no I/O): the target platform (for the offline wheelhouse), the pinned
requirement set, where torch comes from, onnxruntime's execution-provider preference, thread
counts, the training budget a board accepts, and the systemd resource limits of its agent.

Pins are exact (`==`) and tested to resolve for each board's platform tags. Boards that
fine-tune get torch (the CPU build from the PyTorch CPU index: PyPI's aarch64 torch pulls
gigabytes of CUDA libraries a Raspberry Pi cannot use) and onnx (the int8-ONNX -> torch
bridge). On Jetson, torch must come from NVIDIA's JetPack wheels (see `JETSON_TORCH_NOTE`).

docs/boards.md has the table and the reasoning behind each number.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pqsu.protocol.errors import PqsuError

TORCH_VERSION = "2.13.0"                     # constraints.txt pins the same torch for the cloud
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CPU = "CPUExecutionProvider"

# Python 3.11 (Raspberry Pi OS bookworm, Debian 12, Ubuntu 23.04+ with deadsnakes...):
BASE_PY311 = ("numpy==2.4.6", "onnxruntime==1.32.0", "paho-mqtt==2.2.0", "tqdm==4.70.1")
# Python 3.10 (JetPack 6 = Ubuntu 22.04): numpy 1.x (NVIDIA's torch wheels are built against it),
# the last onnxruntime with cp310 aarch64 wheels, and tomli (tomllib arrived in 3.11).
BASE_PY310 = ("numpy==1.26.4", "onnxruntime==1.23.2", "paho-mqtt==2.2.0", "tqdm==4.70.1", "tomli==2.5.0")
ONNX = "onnx==1.23.2"                         # read the int8 model's initializers back (training boards)
# The edge learner reaches pqsu.export.pruning (through the int8-ONNX -> torch bridge), which imports
# torch_pruning at module level: a training board needs it. Pure Python, installed with --no-deps
# (its dependency on torch would pull PyPI's torch onto a Jetson).
NODEPS_TRAINING = ("torch-pruning==1.6.1",)

JETSON_TORCH_NOTE = (
    "PyPI's aarch64 torch is not built for Jetson's GPU: install NVIDIA's JetPack wheel into the "
    "agent's virtualenv, e.g. for JetPack 6.1 (Python 3.10): "
    "PQSU_EXTRA_PIP='https://developer.download.nvidia.com/compute/redist/jp/v61/pytorch/"
    "torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_aarch64.whl' sh /opt/pqsu/bundle/install.sh "
    "(or from the Jetson AI Lab index: PQSU_EXTRA_PIP='torch --index-url https://pypi.jetson-ai-lab.io/jp6/cu126'; "
    "match the wheel to your JetPack release: docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform). "
    "A torch installed system-wide by JetPack is used too (the virtualenv sees system site-packages). "
    "For CUDA/TensorRT inference likewise install onnxruntime-gpu from the Jetson AI Lab index; "
    "until then onnxruntime runs on the CPU and the agent serves predictions without training."
)


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    arch: str                                  # `uname -m` of the board
    glibc: tuple[int, int]                     # newest manylinux tag the board's OS accepts
    python: str                                # X.Y the wheelhouse is built for (the OS's python3)
    python_note: str
    requirements: tuple[str, ...]              # pinned, what every install of this board gets
    trains: bool                               # fine-tunes by default (else inference-only)
    torch: str | None                          # torch pin from `torch_index`, None: not from pip
    torch_index: str | None                    # extra index torch comes from
    torch_note: str                            # how torch gets onto the board
    providers: tuple[str, ...]                 # onnxruntime execution providers, best first; CPU last
    inference_threads: int                     # onnxruntime intra-op threads
    torch_threads: int                         # torch threads while fine-tuning
    max_epochs: float                          # training budget per round (a cap on the round's ask)
    max_batch_size: int
    time_budget_s: float
    memory_max: str                            # systemd MemoryMax=
    cpu_quota: str                             # systemd CPUQuota=
    system_site_packages: bool = False         # the venv sees the OS's packages (JetPack's torch)
    groups: tuple[str, ...] = field(default=())  # systemd SupplementaryGroups= (GPU device nodes)

    def __post_init__(self) -> None:
        if not self.providers or self.providers[-1] != CPU:
            raise ValueError(f"{self.name}: the provider list must end with the CPU fallback")

    def platform_tags(self) -> list[str]:
        """The wheel platform tags this board installs, newest first (for `pip download --platform`)."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 16, -1)]
        return tags + [f"manylinux2014_{self.arch}"]

    def requirement_lines(self, *, inference_only: bool = False) -> list[str]:
        """The pinned requirements of an install: base set, plus onnx and torch on a training board."""
        lines = list(self.requirements)
        if self.trains and not inference_only:
            lines.append(ONNX)
            if self.torch:
                lines.append(self.torch)
        return lines

    def nodeps_lines(self, *, inference_only: bool = False) -> list[str]:
        """Pinned packages installed without their dependencies (training boards only)."""
        return list(NODEPS_TRAINING) if self.trains and not inference_only else []

    @property
    def torch_source(self) -> str:
        if self.torch:
            return f"{self.torch} from {self.torch_index or 'pip sources'}"
        return "NVIDIA JetPack wheel (not PyPI)"

    def summary(self) -> dict:
        return {"board": self.name, "arch": self.arch, "python": self.python, "trains": self.trains,
                "requirements": self.requirement_lines(), "no_deps": self.nodeps_lines(), "torch": self.torch_source,
                "providers": list(self.providers), "inference_threads": self.inference_threads,
                "torch_threads": self.torch_threads, "max_epochs": self.max_epochs,
                "max_batch_size": self.max_batch_size, "time_budget_s": self.time_budget_s,
                "MemoryMax": self.memory_max, "CPUQuota": self.cpu_quota}


_CPU_TORCH = f"torch=={TORCH_VERSION}+cpu"
_CPU_TORCH_NOTE = f"the CPU build of torch {TORCH_VERSION} from {PYTORCH_CPU_INDEX} (no CUDA libraries)"
_ARM_TORCH_NOTE = _CPU_TORCH_NOTE + "; needs a 64-bit OS (PyTorch has no 32-bit ARM wheels)"

BOARDS: dict[str, BoardProfile] = {b.name: b for b in (
    BoardProfile(
        name="rpi4", description="Raspberry Pi 4 (Cortex-A72 x4, 1-8 GB), Raspberry Pi OS 64-bit bookworm",
        arch="aarch64", glibc=(2, 36), python="3.11",
        python_note="the OS's python3 (3.11 on bookworm; use --python 3.13 on trixie)",
        requirements=BASE_PY311, trains=True, torch=_CPU_TORCH, torch_index=PYTORCH_CPU_INDEX,
        torch_note=_ARM_TORCH_NOTE, providers=(CPU,), inference_threads=4, torch_threads=3,
        max_epochs=1, max_batch_size=16, time_budget_s=60, memory_max="1G", cpu_quota="300%"),
    BoardProfile(
        name="rpi5", description="Raspberry Pi 5 (Cortex-A76 x4, 2-16 GB), Raspberry Pi OS 64-bit bookworm",
        arch="aarch64", glibc=(2, 36), python="3.11",
        python_note="the OS's python3 (3.11 on bookworm; use --python 3.13 on trixie)",
        requirements=BASE_PY311, trains=True, torch=_CPU_TORCH, torch_index=PYTORCH_CPU_INDEX,
        torch_note=_ARM_TORCH_NOTE, providers=(CPU,), inference_threads=4, torch_threads=4,
        max_epochs=2, max_batch_size=32, time_budget_s=120, memory_max="2G", cpu_quota="350%"),
    BoardProfile(
        name="jetson-orin", description="NVIDIA Jetson Orin Nano/NX (Cortex-A78AE x6-8, 8-16 GB shared with the GPU), JetPack 6",
        arch="aarch64", glibc=(2, 35), python="3.10",
        python_note="JetPack 6's python3 (3.10, Ubuntu 22.04)",
        requirements=BASE_PY310, trains=True, torch=None, torch_index=None, torch_note=JETSON_TORCH_NOTE,
        providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU), inference_threads=6,
        torch_threads=6, max_epochs=5, max_batch_size=64, time_budget_s=300, memory_max="4G",
        cpu_quota="500%", system_site_packages=True, groups=("video",)),
    BoardProfile(
        name="generic-aarch64", description="any 64-bit ARM Linux board with glibc 2.28+ (Rock, Odroid, Orange Pi...)",
        arch="aarch64", glibc=(2, 28), python="3.11",
        python_note="python3 3.11 (pass --python X.Y for another version)",
        requirements=BASE_PY311, trains=True, torch=_CPU_TORCH, torch_index=PYTORCH_CPU_INDEX,
        torch_note=_ARM_TORCH_NOTE, providers=(CPU,), inference_threads=4, torch_threads=4,
        max_epochs=1, max_batch_size=32, time_budget_s=120, memory_max="1536M", cpu_quota="300%"),
    BoardProfile(
        name="x86_64", description="an x86-64 Linux box or VM with glibc 2.28+ (gateway, NUC, test machine)",
        arch="x86_64", glibc=(2, 28), python="3.11",
        python_note="python3 3.11 (pass --python X.Y to match the box)",
        requirements=BASE_PY311, trains=True, torch=_CPU_TORCH, torch_index=PYTORCH_CPU_INDEX,
        torch_note=_CPU_TORCH_NOTE, providers=(CPU,), inference_threads=4, torch_threads=4,
        max_epochs=5, max_batch_size=64, time_budget_s=300, memory_max="4G", cpu_quota="400%"),
)}


def get_board(name: str) -> BoardProfile:
    try:
        return BOARDS[name]
    except KeyError:
        raise PqsuError(f"unknown board {name!r}; choose one of: {', '.join(BOARDS)}") from None


def format_boards() -> str:
    """The `pqsu flash --list-boards` table."""
    rows = [("board", "arch", "python", "trains", "torch", "onnxruntime providers", "threads inf/torch",
             "budget epochs/batch/s", "MemoryMax", "CPUQuota")]
    for b in BOARDS.values():
        torch = "JetPack (NVIDIA)" if b.torch is None else b.torch.split("==")[1]
        providers = ">".join(p.replace("ExecutionProvider", "") for p in b.providers)
        rows.append((b.name, b.arch, b.python, "yes" if b.trains else "no", torch, providers,
                     f"{b.inference_threads}/{b.torch_threads}", f"{b.max_epochs:g}/{b.max_batch_size}/{b.time_budget_s:g}",
                     b.memory_max, b.cpu_quota))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    for b in BOARDS.values():
        lines.append(f"{b.name}: {b.description}")
        lines.append(f"  python: {b.python_note}")
        lines.append(f"  requirements: {' '.join(b.requirement_lines())}; without dependencies: "
                     f"{' '.join(b.nodeps_lines())}")
        lines.append(f"  torch: {b.torch_note}")
    return "\n".join(lines)
