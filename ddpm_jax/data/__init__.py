"""Data: the sources (digits, image folders, TFDS), the step-derived order and the iterators."""
