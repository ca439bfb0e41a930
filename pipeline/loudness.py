"""Streaming ITU-R BS.1770-4 loudness meter for mono audio.

Audio is fed chunk by chunk; memory stays bounded because only the K-weighting filter
state, a few running scalars and one float per 100 ms of audio (the energy of each
gating sub-block, ~36,000 floats per hour) are kept.  Chunking does not change the
result: the filter state is carried across chunks and the 400 ms gating blocks are
formed from complete 100 ms sub-blocks only.
"""

from __future__ import annotations

import math
from array import array

import numpy as np
from scipy.signal import lfilter

__all__ = ["LoudnessMeter", "clamp_gain_db", "k_weighting_coefficients"]

# BS.1770 K-weighting: stage 1 is a +4 dB high shelf around 1.5 kHz (head model),
# stage 2 a second-order high pass at 38 Hz (RLB curve).
_SHELF_GAIN_DB = 4.0
_SHELF_FC_HZ = 1500.0
_SHELF_Q = 1.0 / math.sqrt(2.0)
_HIGHPASS_FC_HZ = 38.0
_HIGHPASS_Q = 0.5

_LOUDNESS_OFFSET = -0.691  # L = -0.691 + 10 log10(mean square of K-weighted signal)
_ABSOLUTE_GATE_LUFS = -70.0
_RELATIVE_GATE_LU = -10.0
_SUBBLOCKS_PER_BLOCK = 4  # 400 ms block from four 100 ms sub-blocks -> 75 % overlap
_SUBBLOCKS_PER_SECOND = 10


def _bilinear_biquad(
    num: tuple[float, float, float],
    den: tuple[float, float, float],
    fc: float,
    sample_rate: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Map an analog biquad to a digital one with a bilinear transform pre-warped at ``fc``.

    ``num``/``den`` are the coefficients of ``s**2, s, 1`` of the analog prototype with
    ``s`` normalised to the angular frequency ``2*pi*fc``.  Substituting
    ``s = (1 - z**-1) / (K (1 + z**-1))`` with ``K = tan(pi fc / fs)`` and multiplying by
    ``K**2 (1 + z**-1)**2`` gives the digital coefficients below.
    """
    k = math.tan(math.pi * fc / sample_rate)

    def digital(c: tuple[float, float, float]) -> np.ndarray:
        c2, c1, c0 = c
        return np.array(
            [
                c2 + c1 * k + c0 * k * k,
                2.0 * (c0 * k * k - c2),
                c2 - c1 * k + c0 * k * k,
            ],
            dtype=np.float64,
        )

    b = digital(num)
    a = digital(den)
    return b / a[0], a / a[0]


def k_weighting_coefficients(
    sample_rate: int,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Return ``((b_shelf, a_shelf), (b_highpass, a_highpass))`` for ``sample_rate``."""
    # High shelf, analog prototype: H(s) = A (A s^2 + sqrt(A)/Q s + 1) / (s^2 + sqrt(A)/Q s + A)
    # with A = 10^(G/40); gain 1 at DC and A^2 = 10^(G/20) at high frequencies.
    amp = 10.0 ** (_SHELF_GAIN_DB / 40.0)
    root = math.sqrt(amp) / _SHELF_Q
    shelf = _bilinear_biquad(
        (amp * amp, amp * root, amp), (1.0, root, amp), _SHELF_FC_HZ, sample_rate
    )
    # High pass, analog prototype: H(s) = s^2 / (s^2 + s/Q + 1).
    highpass = _bilinear_biquad(
        (1.0, 0.0, 0.0), (1.0, 1.0 / _HIGHPASS_Q, 1.0), _HIGHPASS_FC_HZ, sample_rate
    )
    return shelf, highpass


def _to_db(power: float) -> float:
    """``10*log10(power)``; ``-inf`` for zero."""
    return 10.0 * math.log10(power) if power > 0.0 else -math.inf


class LoudnessMeter:
    """Incremental integrated loudness, RMS and peak of a mono signal.

    Non-finite samples (NaN, +-inf) are counted in :attr:`nonfinite` and replaced by
    zeros: they keep their place in time for the loudness measurement (counting as
    silence) but are left out of the RMS and peak statistics.
    """

    def __init__(self, sample_rate: int) -> None:
        if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate:
            raise ValueError(f"sample_rate must be an integer, got {sample_rate!r}")
        rate = int(sample_rate)
        if rate <= 2 * _SHELF_FC_HZ:
            raise ValueError(f"sample_rate must exceed {2 * _SHELF_FC_HZ:g} Hz, got {rate}")
        self._rate = rate
        (self._b1, self._a1), (self._b2, self._a2) = k_weighting_coefficients(rate)
        self._zi1 = np.zeros(2, dtype=np.float64)
        self._zi2 = np.zeros(2, dtype=np.float64)

        self._n_samples = 0
        self._nonfinite = 0
        self._sum_squares = 0.0  # unweighted, finite samples only
        self._peak = 0.0

        # Energy (sum of squares of the K-weighted signal) of every completed sub-block,
        # plus the running sum of the sub-block in progress.
        self._subblock_energy = array("d")
        self._partial_energy = 0.0
        self._subblock_end = self._boundary(1)

    def _boundary(self, k: int) -> int:
        """Absolute sample index where sub-block ``k`` starts (handles non-integer 100 ms)."""
        return (k * self._rate) // _SUBBLOCKS_PER_SECOND

    @property
    def sample_rate(self) -> int:
        return self._rate

    def update(self, samples: np.ndarray) -> None:
        """Feed the next chunk of mono float samples (any length, incl. 0; float32 or float64)."""
        x = np.asarray(samples)
        if x.ndim != 1:
            raise ValueError(f"expected a 1-D mono chunk, got shape {x.shape}")
        n = x.shape[0]
        if n == 0:
            return
        x = x.astype(np.float64, copy=True)

        finite = np.isfinite(x)
        n_bad = n - int(np.count_nonzero(finite))
        if n_bad:
            x[~finite] = 0.0
            self._nonfinite += n_bad

        self._sum_squares += float(np.dot(x, x))
        self._peak = max(self._peak, float(np.max(np.abs(x))))

        y, self._zi1 = lfilter(self._b1, self._a1, x, zi=self._zi1)
        y, self._zi2 = lfilter(self._b2, self._a2, y, zi=self._zi2)
        energy = y * y

        chunk_start = self._n_samples
        pos = 0
        while pos < n:
            stop = min(n, self._subblock_end - chunk_start)
            self._partial_energy += float(np.sum(energy[pos:stop]))
            pos = stop
            if chunk_start + pos == self._subblock_end:
                self._subblock_energy.append(self._partial_energy)
                self._partial_energy = 0.0
                self._subblock_end = self._boundary(len(self._subblock_energy) + 1)
        self._n_samples += n

    @property
    def n_samples(self) -> int:
        """Number of samples fed so far (non-finite ones included)."""
        return self._n_samples

    @property
    def nonfinite(self) -> int:
        """Count of NaN/inf samples seen (they are excluded from the stats)."""
        return self._nonfinite

    def block_energies(self) -> np.ndarray:
        """Mean square of the K-weighted signal in every complete 400 ms block (step 100 ms)."""
        sub = np.array(self._subblock_energy, dtype=np.float64)
        n_blocks = sub.shape[0] - _SUBBLOCKS_PER_BLOCK + 1
        if n_blocks <= 0:
            return np.zeros(0, dtype=np.float64)
        # Sum four shifted views rather than differencing a cumulative sum, which would
        # lose precision for quiet blocks late in long, loud recordings.
        sums = sub[0:n_blocks].copy()
        for shift in range(1, _SUBBLOCKS_PER_BLOCK):
            sums += sub[shift : shift + n_blocks]
        starts = np.arange(n_blocks + _SUBBLOCKS_PER_BLOCK, dtype=np.int64)
        starts = starts * self._rate // _SUBBLOCKS_PER_SECOND  # sub-block boundaries
        lengths = starts[_SUBBLOCKS_PER_BLOCK:] - starts[:n_blocks]
        return sums / lengths

    @property
    def integrated_lufs(self) -> float:
        """ITU-R BS.1770-4 integrated loudness (K-weighting, 400 ms blocks with 75 % overlap,
        absolute gate -70 LUFS, relative gate -10 LU).

        -inf when silent or shorter than one block.
        """
        z = self.block_energies()
        # Gates expressed on mean squares: l_j > gate  <=>  z_j > 10^((gate + 0.691) / 10).
        absolute = 10.0 ** ((_ABSOLUTE_GATE_LUFS - _LOUDNESS_OFFSET) / 10.0)
        z = z[z > absolute]
        if z.size == 0:
            return -math.inf
        relative = float(np.mean(z)) * 10.0 ** (_RELATIVE_GATE_LU / 10.0)
        z = z[z > relative]
        return _LOUDNESS_OFFSET + _to_db(float(np.mean(z)))

    @property
    def rms_dbfs(self) -> float:
        """20*log10(RMS) over all finite samples (full scale = 1.0); -inf for all-zero/empty."""
        n = self._n_samples - self._nonfinite
        if n == 0:
            return -math.inf
        return _to_db(self._sum_squares / n)

    @property
    def peak_dbfs(self) -> float:
        """20*log10(max |x|) over finite samples; -inf for all-zero/empty."""
        return 2.0 * _to_db(self._peak)


def clamp_gain_db(gain_db: float, max_abs_db: float) -> float:
    """Clamp ``gain_db`` to ``[-max_abs_db, +max_abs_db]``; 0.0 if the gain is not finite."""
    if math.isnan(max_abs_db) or max_abs_db < 0.0:
        raise ValueError(f"max_abs_db must be a non-negative number, got {max_abs_db!r}")
    gain = float(gain_db)
    if not math.isfinite(gain):
        return 0.0
    return float(min(max(gain, -max_abs_db), max_abs_db))
