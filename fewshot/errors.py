"""Domain errors. Every message says what went wrong and what to do next."""


class FewShotError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidImage(FewShotError, ValueError):
    """Bytes that are not a decodable image, or an image outside the limits."""


class ImageTooLarge(InvalidImage):
    """An image over the byte or pixel limit (decompression bombs included)."""


class UnknownEncoder(FewShotError, ValueError):
    """An encoder spec that names no known encoder."""


class WeightsNotFound(FewShotError, FileNotFoundError):
    """Pre-trained weights that are not on this machine; nothing is downloaded."""


class InvalidSource(FewShotError, ValueError):
    """A dataset source that does not exist or cannot be read."""


class OutputConflict(FewShotError):
    """An output folder that holds another job's results."""


class DimensionMismatch(FewShotError, ValueError):
    """A vector or batch of the wrong shape for the encoder or gallery."""
