"""compress.bisection: the one bisection behind the budget searches."""
from yolocompress.compress.bisection import bisect


def test_bisect_brackets_the_first_x_reaching_the_target():
    calls = []

    def test(x):
        calls.append(x)
        return 1 if x >= 0.3 else -1

    lo, hi, found = bisect(test, 0.0, 1.0, 1 / 64)
    assert found is None
    assert lo < 0.3 <= hi and hi - lo <= 1 / 64
    # by hand: six halvings take the width from 1 to 1/64, which is not > 1/64
    assert calls == [0.5, 0.25, 0.375, 0.3125, 0.28125, 0.296875]
    assert (lo, hi) == (0.296875, 0.3125)


def test_bisect_stops_where_the_test_says_close_enough():
    calls = []

    def test(x):
        calls.append(x)
        return 0 if abs(x - 0.375) < 1e-12 else (1 if x > 0.375 else -1)

    lo, hi, found = bisect(test, 0.0, 1.0, 1e-9)
    assert found == 0.375 and calls == [0.5, 0.25, 0.375] and (lo, hi) == (0.25, 0.5)


def test_bisect_does_not_evaluate_when_the_bracket_is_already_narrow():
    assert bisect(lambda x: 1 / 0, 0.2, 0.2 + 1e-9, 1e-7) == (0.2, 0.2 + 1e-9, None)
