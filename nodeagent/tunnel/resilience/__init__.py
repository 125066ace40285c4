"""Choosing and protecting backends: balancing, outlier ejection, circuit breaking. Pure."""
