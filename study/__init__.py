"""caption-study: a Ray Tune study of recurrent image captioners (memory seeding vs the other injections)."""

__version__ = "0.1.0"
