"""Code layouts: plain, SpeechGPT unit strings, Mini-Omni's 7 delayed SNAC streams."""

from __future__ import annotations

import numpy as np
import pytest

from speechmill.manifests.tokenizers.layouts import (
    LAYOUTS,
    MINI_OMNI,
    mini_omni_flatten,
    mini_omni_unflatten,
    parse_speechgpt_units,
    plain,
    speechgpt_units,
)

PAD, EOA, STRIDE, SHIFT = 4097, 4096, 4160, 152000


def _snac(t: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 4096, size=t * 2**j) for j in range(3)]


def test_plain():
    a = plain(np.array([[1, 2, 3], [4, 5, 6]], np.int32))
    assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.shape == (2, 3)
    assert plain(np.array([7, 8])).shape == (1, 2)
    multi = plain([np.array([[1, 2]]), np.array([3, 4, 5, 6])])
    assert [m.tolist() for m in multi] == [[1, 2], [3, 4, 5, 6]]
    with pytest.raises(ValueError, match="integers"):
        plain(np.array([[0.5]]))
    assert set(LAYOUTS) == {"plain", "speechgpt", "mini-omni"}


def test_speechgpt_units_format():
    # SpeechGPT's speech2unit: "<sosp>" + "".join(f"<{u}>") + "<eosp>", merged units
    assert speechgpt_units([123, 456]) == "<sosp><123><456><eosp>"
    merged = "<sosp><5><9><5><0><eosp>"
    assert speechgpt_units(np.array([[5, 5, 9, 9, 9, 5, 0]]), dedup=True) == merged
    assert speechgpt_units([5, 5, 9]) == "<sosp><5><5><9><eosp>"  # as given by default
    assert speechgpt_units([5, 9, 5, 0], dedup=True) == merged  # idempotent
    assert speechgpt_units([]) == "<sosp><eosp>"
    assert parse_speechgpt_units("<sosp><5><9><5><0><eosp>").tolist() == [5, 9, 5, 0]
    u = np.random.default_rng(0).integers(0, 1000, 200)
    assert parse_speechgpt_units(speechgpt_units(u)).tolist() == u.tolist()
    with pytest.raises(ValueError):
        parse_speechgpt_units("<sosp><5><x><eosp>")
    with pytest.raises(ValueError):
        speechgpt_units(np.zeros((2, 3), int))


def test_mini_omni_constants_match_mini_omni_code():
    m = MINI_OMNI
    assert (m["text_vocab_size"], m["padded_text_vocab_size"]) == (151936, 152000)
    assert (m["audio_vocab_size"], m["padded_audio_vocab_size"]) == (4096, 4160)
    assert (m["eoa"], m["pad_a"], m["input_a"], m["answer_a"], m["split"]) == (
        4096, 4097, 4098, 4099, 4100)
    assert (m["eot"], m["pad_t"], m["input_t"], m["answer_t"], m["asr"]) == (
        151936, 151937, 151938, 151939, 151940)
    assert m["delays"] == [1, 2, 3, 4, 5, 6, 7]
    import json

    assert json.loads(json.dumps(m)) == m  # goes into shard metadata as is


@pytest.mark.parametrize("t", [0, 1, 5, 37])
@pytest.mark.parametrize("opts", [{}, {"shift": 0}, {"bos": 4099}, {"eos": False},
                                  {"shift": 0, "bos": 4098, "eos": False}])
def test_mini_omni_round_trip(t, opts):
    codes = _snac(t, seed=t)
    flat = mini_omni_flatten(codes, **opts)
    b = 1 if opts.get("bos") is not None else 0
    e = 1 if opts.get("eos", True) else 0
    assert flat.shape == (7, b + t + 7 + e) and flat.dtype == np.int64
    back = mini_omni_unflatten(flat, **opts)
    assert [x.tolist() for x in back] == [x.tolist() for x in codes]


def test_mini_omni_delays_offsets_and_order():
    c0, c1, c2 = _snac(4, seed=1)
    flat = mini_omni_flatten([c0, c1, c2])  # default: layershift (152000 + i * 4160), eoa
    t = 4
    local = flat - SHIFT - np.arange(7)[:, None] * STRIDE
    # every id of stream i lies in stream i's own 4160-wide slice after the text vocab
    for i in range(7):
        assert np.all((flat[i] >= SHIFT + i * STRIDE) & (flat[i] < SHIFT + (i + 1) * STRIDE))
    # stream i: i + 1 pads, T codes, eoa, then pads
    for i in range(7):
        row = local[i].tolist()
        assert row[: i + 1] == [PAD] * (i + 1)
        assert row[i + 1 + t] == EOA
        assert row[i + 2 + t :] == [PAD] * (6 - i)
    # Mini-Omni's per-frame order: c0[t], c1[2t], c2[4t], c2[4t+1], c1[2t+1], c2[4t+2],
    # c2[4t+3]
    for f in range(t):
        frame = [local[i, f + i + 1] for i in range(7)]
        assert frame == [c0[f], c1[2 * f], c2[4 * f], c2[4 * f + 1], c1[2 * f + 1],
                         c2[4 * f + 2], c2[4 * f + 3]]
    # same as Mini-Omni's layershift(input_id, layer) = input_id + 152000 + layer * 4160
    assert flat[3, 0] == PAD + 152000 + 3 * 4160
    # reading the streams back the way Mini-Omni's reconscruct_snac does (drop i + 1
    # leading tokens of stream i, then take one token per stream per step) gives the
    # SNAC frames in order
    steps = [[int(local[i, i + 1 + s]) for i in range(7)] for s in range(t)]
    assert steps[2] == [c0[2], c1[4], c2[8], c2[9], c1[5], c2[10], c2[11]]


def test_mini_omni_validation():
    c = _snac(3)
    with pytest.raises(ValueError, match="3 codebooks"):
        mini_omni_flatten(c[:2])
    with pytest.raises(ValueError, match="rates 1:2:4"):
        mini_omni_flatten([c[0], c[1][:-1], c[2]])
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        mini_omni_flatten([c[0], c[1], np.full(12, 4096)])
    # SNAC returns [1, n] tensors per codebook: accepted
    flat = mini_omni_flatten([x[None, :] for x in c])
    assert np.array_equal(flat, mini_omni_flatten(c))
    with pytest.raises(ValueError, match="wrong shift"):
        mini_omni_unflatten(flat, shift=0)
    bad = flat.copy()
    bad[2, 0] += 1  # delay column no longer pad
    with pytest.raises(ValueError, match="delay"):
        mini_omni_unflatten(bad)
    assert [x.tolist() for x in mini_omni_unflatten(bad, strict=False)] == [
        x.tolist() for x in c]
    with pytest.raises(ValueError, match=r"\[7, L\]"):
        mini_omni_unflatten(flat[:6])
