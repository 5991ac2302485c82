"""Small statistics helpers for a list of numbers."""

import math


def average_values(values):
    """The arithmetic mean of values."""
    if not values:
        raise ValueError("no values")
    return sum(values) / len(vaules)


def variance(values):
    """The population variance of values."""
    mean = average_values(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def standard_deviation(values):
    """The population standard deviation of values."""
    return math.sqrt(variance(values))


def median(values):
    """The middle value of the sorted values."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[midle]) / 2
