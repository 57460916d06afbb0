"""The ETH/UCY reader: published window counts, Social-GAN's loader written out as an oracle,
and errors that point at the offending file and line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from meanwise.trajectory.data import (
    load_split,
    read_annotations,
    split_dir,
    windows_from_annotations,
)

# scenes / pedestrian-windows of the test subsets, as published with Social-STGCNN/-Implicit
EXPECTED_COUNTS = {
    "eth": (70, 181),
    "hotel": (301, 1053),
    "univ": (947, 24334),
    "zara1": (602, 2253),
    "zara2": (921, 5833),
    "sdd": (292, 738),
}


@pytest.mark.parametrize("split", sorted(EXPECTED_COUNTS))
def test_test_window_counts_match_the_published_ones(data_root, split):
    scenes = load_split(split, "test", data_root)
    assert (len(scenes), sum(s.num_pedestrians for s in scenes)) == EXPECTED_COUNTS[split]


def _social_gan_windows(
    data: np.ndarray, seq_len: int = 20, min_ped: int = 1, rounded: bool = True
):
    """The protocol of the data README as a plain per-window loop over pedestrians; `rounded`:
    Social-GAN's np.around(..., decimals=4) of each track (Social-Implicit comments it out)."""
    frames = np.unique(data[:, 0]).tolist()
    frame_data = [data[frame == data[:, 0], :] for frame in frames]
    num_sequences = int(math.ceil((len(frames) - seq_len + 1) / 1))
    out = []
    for idx in range(0, num_sequences + 1):
        curr = np.concatenate(frame_data[idx : idx + seq_len], axis=0)
        peds = np.unique(curr[:, 1])
        tracks = []
        for ped_id in peds:
            seq = curr[curr[:, 1] == ped_id, :]
            if rounded:
                seq = np.around(seq, decimals=4)
            pad_front = frames.index(seq[0, 0]) - idx
            pad_end = frames.index(seq[-1, 0]) - idx + 1
            if pad_end - pad_front != seq_len:
                continue
            tracks.append((ped_id, seq[:, 2:]))
        if len(tracks) > min_ped:
            out.append((frames[idx], tracks))
    return out


@pytest.mark.parametrize("decimals", [None, 4])
def test_windows_equal_the_reference_loaders_on_zara1(data_root, decimals):
    """decimals=None: Social-Implicit's loader (no rounding); 4: Social-GAN's."""
    path = split_dir(data_root, "zara1", "test") / "crowds_zara01.txt"
    data = read_annotations(path)
    ours = windows_from_annotations(data, decimals=decimals)
    reference = _social_gan_windows(data, rounded=decimals == 4)
    assert len(ours) == len(reference)
    for scene, (first_frame, tracks) in zip(ours, reference, strict=True):
        assert scene.frame_ids[0].item() == first_frame
        assert scene.pedestrian_ids.tolist() == [t[0] for t in tracks]
        expected = torch.tensor(np.stack([t[1] for t in tracks], axis=1))  # [20, N, 2]
        assert torch.equal(torch.cat([scene.observed, scene.future]), expected)


def test_rounding_moves_positions_by_at_most_half_a_decimal(data_root):
    path = split_dir(data_root, "zara1", "test") / "crowds_zara01.txt"
    data = read_annotations(path)
    raw, rounded = windows_from_annotations(data), windows_from_annotations(data, decimals=4)
    diff = max(
        float((a.observed - b.observed).abs().max()) for a, b in zip(raw, rounded, strict=True)
    )
    assert 0 < diff <= 5e-5  # the files hold more than 4 decimals, so the choice is visible


def test_hand_made_windowing_gaps_and_order(tmp_path):
    rows = []
    # ped 7 in frames 0..19 (full), ped 3 in 0..19 but missing frame 50 (index 5),
    # ped 5 in 1..20 (full, starts one window later); frame ids jump by 10 except 60 -> 200
    frame_ids = [10 * i for i in range(21)]
    frame_ids[-1] = 2000
    for i, f in enumerate(frame_ids):
        if i < 20:
            rows.append((f, 7, i, 0.0))
            if i != 5:
                rows.append((f, 3, 0.0, i))
        if i >= 1:
            rows.append((f, 5, i, i + 0.123456))
    data = np.asarray(rows, dtype=np.float64)
    assert windows_from_annotations(data) == []  # no window has 2 full pedestrians
    rows.extend((frame_ids[i], 9, -1.0, float(i)) for i in range(1, 21))
    scenes = windows_from_annotations(np.asarray(rows))
    assert len(scenes) == 1
    assert scenes[0].pedestrian_ids.tolist() == [5, 9]  # ascending id, ped 7/3 excluded
    assert scenes[0].frame_ids.tolist() == frame_ids[1:]
    assert scenes[0].observed[0, 0].tolist() == [1.0, 1.123456]  # as in the file
    rounded = windows_from_annotations(np.asarray(rows), decimals=4)
    assert rounded[0].observed[0, 0].tolist() == [1.0, 1.1235]  # Social-GAN's 4 decimals
    rel = scenes[0].observed_displacements()
    assert torch.equal(rel[0], torch.zeros(2, 2)) and torch.allclose(
        rel[1:], scenes[0].observed[1:] - scenes[0].observed[:-1]
    )


@pytest.mark.parametrize(
    "line, message",
    [
        ("10\t1\t2.0\n", "expected 4 fields"),
        ("10\t1\tx\t2.0\n", "fields must be numbers"),
        ("10\t1\tnan\t2.0\n", "non-finite"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "scene.txt"
    path.write_text("0\t1\t1.0\t2.0\n\n" + line)
    with pytest.raises(ValueError, match=rf"scene\.txt:3: {message}"):
        read_annotations(path)


def test_duplicate_annotation_and_bad_arguments_raise(tmp_path):
    data = np.asarray([(f, 1, 0.0, 0.0) for f in range(20)] + [(3, 1, 1.0, 1.0)], float)
    with pytest.raises(ValueError, match="annotated twice in frame 3"):
        windows_from_annotations(data)
    with pytest.raises(ValueError, match="split must be one of"):
        split_dir(tmp_path, "mars", "test")
    with pytest.raises(ValueError, match="subset must be one of"):
        split_dir(tmp_path, "eth", "dev")
    with pytest.raises(ValueError, match="no eth/test"):
        split_dir(tmp_path, "eth", "test")
    with pytest.raises(ValueError, match="data_dir"):
        split_dir(tmp_path / "missing", "eth", "test")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "give no scene"),
        (b"\n  \n", "give no scene"),
        (b"1 1 0.0 0.0\n2 1 0.1 0.0\n", "give no scene"),  # one pedestrian, two frames
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a text annotation file"),
    ],
)
def test_unusable_data_files_are_named(tmp_path, content, fragment):
    """Issue 16: these gave "scenes is empty" with no file named, or a bare decode error."""
    from meanwise.trajectory.data import load_split

    folder = tmp_path / "eth" / "test"
    folder.mkdir(parents=True)
    (folder / "biwi_eth.txt").write_bytes(content)
    with pytest.raises(ValueError, match=fragment) as info:
        load_split("eth", "test", data_dir=tmp_path)
    assert "biwi_eth.txt" in str(info.value) or str(folder) in str(info.value)
