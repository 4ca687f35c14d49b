"""How far two float32 computations of the same sums, in other orders, may differ.

A sum of K products computed in float32, in any order, with or without fused
multiply-adds, is within gamma(K) = K u / (1 - K u) of the exact sum times the
sum of the products' magnitudes, u = 2**-24 being float32's unit roundoff
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5).
Through a chain of such sums (a convolution of a convolution, a gradient) the
lengths add, to first order (Higham, lemma 3.3). Each of two computations is
that close to the exact result, so they differ by at most twice as much. This
holds whatever the kernels, blocking or thread count, which is what two
machines, or oneDNN on and off, change; a wrong result (a misplaced group, a
dropped term) is off by the size of the terms themselves.

The magnitudes: for one or two sums, the same computation on the absolute
values of the inputs and weights gives them exactly. Through a deeper chain
that worst case compounds the magnitudes of every stage while the values
cancel (a V-cycle's reached 10^4 times its outputs), and would pass anything.
There the largest result stands in, where the chain's values stay at the
results' scale: rounding errors of random sign add up to about sqrt(K) u times
the terms' magnitudes, and K terms of random sign to about 1 / sqrt(K) of them,
so a sum rounds by about K u times its own size: the worst case's figure, at
the results' scale.
"""

import numpy as np

UNIT_ROUNDOFF = 2.0**-24


def assert_within_rounding(actual, expected, length, magnitudes):
    """Asserts that `actual` and `expected` differ by no more than rounding can make them.

    That is, by at most 2 gamma(length) magnitudes, value by value.

    Args:
        actual, expected: two float32 computations of the same values.
        length: the most terms summed one after another on the way to a value
            (a bound on the total length of its chain of sums).
        magnitudes: for every value, the magnitude of its terms: an array, or
            one scale for all.
    """
    actual, expected, magnitudes = (
        np.asarray(values, np.float64) for values in (actual, expected, magnitudes)
    )
    gamma = length * UNIT_ROUNDOFF / (1 - length * UNIT_ROUNDOFF)
    difference = np.abs(actual - expected)
    bound = np.broadcast_to(2 * gamma * magnitudes, difference.shape)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(difference - bound), difference.shape))
    assert difference[worst] <= bound[worst], (
        f"at {worst}: {actual[worst]} against {expected[worst]}, a difference of "
        f"{difference[worst]:.3g}, more than rounding can make in sums of {length} terms "
        f"of magnitude {np.broadcast_to(magnitudes, difference.shape)[worst]:.3g} "
        f"({bound[worst]:.3g})"
    )
