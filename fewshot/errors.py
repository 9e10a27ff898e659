"""Domain errors. Every message says what went wrong and what to do next."""


class FewShotError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidImage(FewShotError, ValueError):
    """Bytes that are not a decodable image, or an image outside the limits."""


class ImageTooLarge(InvalidImage):
    """An image over the byte or pixel limit (decompression bombs included)."""


class NoFace(InvalidImage):
    """An image in which a face encoder found no face."""

    code = "no_face"


class FaceChoice(InvalidImage):
    """An enrollment photo whose face cannot be taken as it is; ``details["faces"]`` lists every face found
    (box, detector score, measurements, problems) for the client to choose from."""

    def __init__(self, message: str, faces: list[dict] | None = None) -> None:
        super().__init__(message)
        self.details = {"faces": faces or []}

    def naming(self, where: str) -> "FaceChoice":
        """The same error with ``where`` (e.g. "image 2") before its message."""
        return type(self)(f"{where}: {self}", self.details["faces"])


class FaceQuality(FaceChoice):
    """The face is too small, too blurred or too unlike a face to enroll (``quality=off`` forces it)."""

    code = "face_quality"


class SeveralFaces(FaceChoice):
    """Several faces could be enrolled and the request did not say which."""

    code = "several_faces"


class UnknownEncoder(FewShotError, ValueError):
    """An encoder spec that names no known encoder."""


class WeightsNotFound(FewShotError, FileNotFoundError):
    """Pre-trained weights that are not on this machine; nothing is downloaded."""


class TorchMissing(FewShotError, ImportError):
    """PyTorch (or timm) asked for by a job that needs it (exporting, fine-tuning, CUDA) where it is not
    installed: a serving-only install runs exported encoders on ONNX Runtime without it."""


class InvalidSource(FewShotError, ValueError):
    """A dataset source that does not exist or cannot be read."""


class OutputConflict(FewShotError):
    """An output folder that holds another job's results."""


class DimensionMismatch(FewShotError, ValueError):
    """A vector or batch of the wrong shape for the encoder or gallery."""


class InvalidVector(FewShotError, ValueError):
    """A vector with NaN or infinity, or all zeros."""


class InvalidArgument(FewShotError, ValueError):
    """A parameter outside its range: a head, k, a threshold or a false-accept rate."""


class InvalidLabel(FewShotError, ValueError):
    """An empty, over-long or control-character label."""


class InvalidName(InvalidLabel):
    """A gallery name outside the allowed characters or length."""


class UnknownLabel(FewShotError, KeyError):
    """A class that is not enrolled."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownExample(UnknownLabel):
    """An example id that is not in the gallery."""


class UnknownGallery(UnknownLabel):
    """A gallery that does not exist."""


class LabelExists(FewShotError, ValueError):
    """Enrolling or renaming onto a class that already exists."""


class FingerprintMismatch(FewShotError, ValueError):
    """Vectors from another encoder than the gallery's: re-embed explicitly, never mix."""


class EmptyGallery(FewShotError):
    """A query against a gallery with no enrolled class."""


class Overloaded(FewShotError):
    """The request queue is full; retry after a moment."""


class Busy(FewShotError):
    """A bounded kind of background work (e.g. adapt jobs) is at its limit; retry later."""


class GalleryClosed(FewShotError):
    """A gallery object used after its store closed it (evicted or shut down); open it again."""


class StoreUnavailable(FewShotError):
    """The gallery database cannot be reached (restarting, network): nothing was changed; retry shortly."""


class StoreMissing(FewShotError):
    """A store whose client library is not installed (e.g. PostgreSQL without psycopg)."""
