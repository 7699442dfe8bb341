"""The one record every loader yields and every recipe consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad input data; the message names the file or row and the fix."""


@dataclass
class Sample:
    """An (image, prompt, response) triple.

    ``image`` is a path (decoded lazily, so datasets of millions stay cheap) or a PIL image.
    ``source`` says where the row came from, for error messages.
    """

    id: str
    image: str | Path | Image.Image | None
    prompt: str
    response: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        if self.image is None or isinstance(self.image, Image.Image):
            return self.image
        try:
            with Image.open(self.image) as img:
                return img.convert("RGB")
        except FileNotFoundError as err:
            raise DataError(
                f"{self.source}: sample '{self.id}': image file '{self.image}' does not exist;"
                " fix the path or drop the row."
            ) from err
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(
                f"{self.source}: sample '{self.id}': cannot decode image '{self.image}' ({err});"
                " replace the file or drop the row."
            ) from err
