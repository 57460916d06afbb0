"""ETH/UCY (and SDD) pedestrian trajectories: the text reader and the standard windowing.

The protocol is Social-GAN's loader, used unchanged by Social-STGCNN and Social-Implicit, so that
numbers are comparable with the published tables: per file, the sorted unique frame ids; a window
starts at every unique frame and spans 20 consecutive unique frames (8 observed + 12 predicted),
whatever the gap in frame ids between them; a pedestrian belongs to a window when it is annotated
in all 20 of them; windows with at least 2 such pedestrians are kept; pedestrians are ordered by
ascending id (Social-Implicit's global stream convolves across that axis, so the order changes
predictions).

Rounding. Social-GAN's and Social-STGCNN's loaders round every position to 4 decimals;
Social-Implicit's (`TrajectoryDataset` in its utils.py, used by its train.py and by both of its
test scripts) has that line commented out and reads the files' values as they are. The default
here, `decimals=None`, follows Social-Implicit, whose weights and numbers this package
reproduces; `decimals=4` gives Social-GAN's windows. The two differ by at most 5e-5 m per
position (ZARA1's best-of-20 ADE of the released weights moves by about 4e-6 m).

Windowing is vectorised (one sort of all annotations by pedestrian and frame), so the largest
split loads in well under a second and nothing is cached on disk (no pickles).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Scene",
    "SPLITS",
    "SUBSETS",
    "OBS_LEN",
    "PRED_LEN",
    "DATA_DIR_ENV",
    "read_annotations",
    "windows_from_annotations",
    "load_scenes",
    "load_split",
    "resolve_data_dir",
    "user_data_dir",
    "split_dir",
    "observed_displacements",
]

OBS_LEN, PRED_LEN = 8, 12
SPLITS: tuple[str, ...] = ("eth", "hotel", "univ", "zara1", "zara2", "sdd")
SUBSETS: tuple[str, ...] = ("train", "val", "test")
DATA_DIR_ENV = "MEANWISE_DATA_DIR"
# src/meanwise/trajectory/data.py -> the repository root is three folders up
_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Scene:
    """One window: absolute positions of N pedestrians, float64, metres.

    `observed` is [8, N, 2] and `future` [12, N, 2] (time, pedestrian, x/y); `pedestrian_ids`
    ([N], ascending) and `frame_ids` ([20]) say where the window came from.
    """

    observed: Tensor
    future: Tensor
    pedestrian_ids: Tensor
    frame_ids: Tensor
    source: str = ""

    @property
    def num_pedestrians(self) -> int:
        return int(self.observed.shape[1])

    def observed_displacements(self) -> Tensor:
        """[8, N, 2]: 0 for the first step, then position[t] - position[t-1]."""
        return observed_displacements(self.observed)

    def future_displacements(self) -> Tensor:
        """[12, N, 2]: each future position minus the one before (the last observed first)."""
        path = torch.cat([self.observed[-1:], self.future], dim=0)
        return path[1:] - path[:-1]


def observed_displacements(observed: Tensor) -> Tensor:
    """[T, N, 2] positions -> [T, N, 2] displacements with a zero first step (the loader's)."""
    if observed.dim() != 3 or observed.shape[-1] != 2:
        raise ValueError(f"observed must be [T, N, 2]; got shape {tuple(observed.shape)}")
    rel = torch.zeros_like(observed)
    rel[1:] = observed[1:] - observed[:-1]
    return rel


def read_annotations(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a `frame_id ped_id x y` file (tab or space separated) into a float64 [M, 4] array.

    Blank lines are skipped. Anything else that is not four finite numbers raises a ValueError
    naming the file and the 1-based line number, because a silently skipped or misparsed line
    would shift every window after it.
    """
    path = Path(path)
    rows: list[tuple[float, float, float, float]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not a text annotation file (byte {error.start} is not UTF-8)"
        ) from None
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise ValueError(
                f"{path}:{line_number}: expected 4 fields (frame_id ped_id x y); "
                f"got {len(fields)}: {line.rstrip()!r}"
            )
        try:
            values = tuple(float(f) for f in fields)
        except ValueError:
            raise ValueError(
                f"{path}:{line_number}: fields must be numbers; got {line.rstrip()!r}"
            ) from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{path}:{line_number}: non-finite value in {line.rstrip()!r}")
        rows.append(values)  # type: ignore[arg-type]
    if not rows:
        return np.zeros((0, 4), dtype=np.float64)
    return np.asarray(rows, dtype=np.float64)


def windows_from_annotations(
    annotations: np.ndarray,
    *,
    obs_len: int = OBS_LEN,
    pred_len: int = PRED_LEN,
    min_pedestrians: int = 2,
    source: str = "",
    decimals: int | None = None,
) -> list[Scene]:
    """Cut one file's annotations ([M, 4]: frame, ped, x, y) into scenes, step 1; positions
    rounded to `decimals` if given (4: Social-GAN's loader; None: Social-Implicit's).

    Raises:
        ValueError: a bad shape, or the same pedestrian annotated twice in one frame (the
            reference loader would silently mix the two tracks).
    """
    if annotations.ndim != 2 or annotations.shape[1] != 4:
        raise ValueError(f"annotations must be [M, 4]; got shape {annotations.shape}")
    if obs_len < 1 or pred_len < 1:
        raise ValueError(f"obs_len and pred_len must be >= 1; got {obs_len}, {pred_len}")
    if min_pedestrians < 1:
        raise ValueError(f"min_pedestrians must be >= 1; got {min_pedestrians}")
    seq_len = obs_len + pred_len
    if len(annotations) < seq_len:
        return []
    frames = np.unique(annotations[:, 0])
    frame_index = np.searchsorted(frames, annotations[:, 0])
    ped = annotations[:, 1]
    order = np.lexsort((frame_index, ped))
    frame_index, ped = frame_index[order], ped[order]
    xy = annotations[order, 2:4]
    if decimals is not None:
        xy = np.around(xy, decimals=decimals)
    same = (ped[1:] == ped[:-1]) & (frame_index[1:] == frame_index[:-1])
    if same.any():
        row = int(order[1:][same][0])
        raise ValueError(
            f"{source or 'annotations'}: pedestrian {ped[1:][same][0]:g} is annotated twice in "
            f"frame {frames[frame_index[1:][same][0]]:g} (data row {row + 1})"
        )
    # sorted by (ped, frame) without repeats: rows i..i+seq_len-1 are one pedestrian in
    # seq_len consecutive unique frames exactly when the ends match in ped and frame span
    last = len(ped) - seq_len + 1
    full = (ped[:last] == ped[seq_len - 1 :]) & (
        frame_index[seq_len - 1 :] - frame_index[:last] == seq_len - 1
    )
    starts = np.nonzero(full)[0]
    if len(starts) == 0:
        return []
    start_frame = frame_index[starts]
    # group by window start, pedestrians ascending inside each window
    by_window = np.lexsort((ped[starts], start_frame))
    starts, start_frame = starts[by_window], start_frame[by_window]
    tracks = xy[starts[:, None] + np.arange(seq_len)[None, :]]  # [W, seq_len, 2]
    boundaries = np.flatnonzero(np.diff(start_frame)) + 1
    scenes: list[Scene] = []
    for lo, hi in zip(
        np.concatenate([[0], boundaries]), np.concatenate([boundaries, [len(starts)]]), strict=True
    ):
        if hi - lo < min_pedestrians:
            continue
        positions = torch.from_numpy(np.ascontiguousarray(tracks[lo:hi].transpose(1, 0, 2)))
        first = int(start_frame[lo])
        scenes.append(
            Scene(
                observed=positions[:obs_len],
                future=positions[obs_len:],
                pedestrian_ids=torch.from_numpy(ped[starts[lo:hi]].copy()),
                frame_ids=torch.from_numpy(frames[first : first + seq_len].copy()),
                source=source,
            )
        )
    return scenes


def load_scenes(
    paths: Sequence[str | os.PathLike[str]],
    *,
    min_pedestrians: int = 2,
    decimals: int | None = None,
) -> list[Scene]:
    """Read and window each file separately (windows never span two files), in path order."""
    scenes: list[Scene] = []
    for path in paths:
        scenes.extend(
            windows_from_annotations(
                read_annotations(path),
                min_pedestrians=min_pedestrians,
                source=Path(path).name,
                decimals=decimals,
            )
        )
    return scenes


def user_data_dir() -> Path:
    """Where `meanwise trajectory fetch-data` puts the data by default:
    $XDG_CACHE_HOME/meanwise/data, else ~/.cache/meanwise/data."""
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "meanwise" / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The data folder: `data_dir`, else $MEANWISE_DATA_DIR, else ../shared/data beside the
    repository if it exists, else `user_data_dir()` (where `meanwise trajectory fetch-data`
    writes by default) if it holds eth_ucy/, else None (callers fall back to synthetic data
    or skip)."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise ValueError(f"data_dir {str(path)!r} is not a directory")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise ValueError(f"${DATA_DIR_ENV}={env!r} is not a directory")
        return path
    default = _REPO_ROOT.parent / "shared" / "data"
    if default.is_dir():
        return default
    fetched = user_data_dir()
    return fetched if (fetched / "eth_ucy").is_dir() else None


def split_dir(data_dir: str | os.PathLike[str] | None, split: str, subset: str) -> Path:
    """The folder holding `split`'s `subset` files; accepts the data root (with `eth_ucy/`)
    or the `eth_ucy` folder itself."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}; got {subset!r}")
    root = resolve_data_dir(data_dir)
    if root is None:
        raise ValueError(
            f"no data directory: pass data_dir (--data-dir) or set ${DATA_DIR_ENV}; "
            "`meanwise trajectory fetch-data` downloads the files"
        )
    for base in (root / "eth_ucy", root):
        folder = base / split / subset
        if folder.is_dir():
            return folder
    raise ValueError(
        f"data_dir {str(root)!r} has no {split}/{subset} (nor eth_ucy/{split}/...); "
        "`meanwise trajectory fetch-data` downloads the files"
    )


def load_split(
    split: str,
    subset: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    decimals: int | None = None,
) -> list[Scene]:
    """The scenes of one leave-one-out split's `subset`, files in name order (`decimals`: see
    the module docstring)."""
    folder = split_dir(data_dir, split, subset)
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".txt")
    if not paths:
        raise ValueError(f"{folder} holds no .txt files")
    scenes = load_scenes(paths, decimals=decimals)
    if not scenes:
        raise ValueError(
            f"{folder}: its files ({', '.join(p.name for p in paths[:5])}) give no scene of "
            f"{OBS_LEN + PRED_LEN} frames with at least 2 pedestrians (empty, too short or "
            "single-pedestrian files?)"
        )
    return scenes
