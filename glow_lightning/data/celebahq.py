"""CelebA-HQ (Karras et al., 2018, "Progressive Growing of GANs for Improved Quality, Stability, and
Variation"): 30,000 faces, here at 256x256 and 5 bits per channel as the Glow paper's most shown
samples (Kingma & Dhariwal, 2018, section 6; openai/glow's README: ``--problem celeba --image_size 256
--n_level 6 --depth 32 --flow_coupling 0`` (additive) ``--n_bits_x 5``, ``n_test`` 3000).

Data: a folder of the images, either lossless PNGs (e.g. made with the progressive_growing_of_gans
``dataset_tool.py create_celebahq``, or the 256x256 PNGs of other exports) or the common
``data256x256/*.jpg`` export. The JPEG export is lossy: its bits/dim is not comparable with the
paper's, which was measured on lossless data. Images of another size are resized (antialiased).

Split (fixed, by sorted file name): the last ``ceil(N / 10)`` files are the test set and the rest the
training set, i.e. 27,000 / 3,000 for the 30,000 images (openai/glow also tests on 3,000); the
validation set is held out of the training files (``val_size``, seeded).
"""

from __future__ import annotations

import math
import os

from .base import DatasetError, DownloadError, GlowDataModule
from .folder import ImageFiles, check_images, find_images

CELEBAHQ_URL = "https://github.com/tkarras/progressive_growing_of_gans"


def num_test_images(num_images: int) -> int:
    """Test images of a folder of ``num_images``: ceil(N / 10) (3,000 of 30,000)."""
    return math.ceil(num_images / 10)


class CelebAHQDataModule(GlowDataModule):
    """CelebA-HQ faces from a folder (``data_dir`` or ``data_dir/data256x256``); 5 bits by default.

    Args:
        image_size: height and width the images are resized to (256).
        n_bits: bits per colour channel (5, as in the paper).
        val_size: training images held out for validation (seeded), a count or a fraction.
        check_files: open every file's header at setup and report all unreadable files at once.
        download: CelebA-HQ is built by hand; with ``true`` a missing folder is reported with how.
        **kwargs: the shared options of :class:`GlowDataModule` (data_dir, batch_size, ...).
    """

    num_channels = 3
    check_shapes = False  # every image is resized to image_size on loading

    def __init__(
        self,
        *,
        image_size: int = 256,
        n_bits: int = 5,
        val_size: int | float = 1000,
        check_files: bool = True,
        download: bool = False,
        **kwargs,
    ):
        super().__init__(n_bits=n_bits, val_size=val_size, download=download, **kwargs)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.image_size, self.check_files = image_size, check_files
        self._paths: list[str] | None = None

    @property
    def folder(self) -> str:
        sub = os.path.join(self.data_dir, "data256x256")
        return sub if os.path.isdir(sub) else self.data_dir

    def paths(self) -> list[str]:
        """All image files of the folder, sorted by name (recursively, hidden files skipped)."""
        if self._paths is None:
            found = find_images(self.folder) if os.path.isdir(self.folder) else []
            if len(found) < 2:
                how = f"build it with dataset_tool.py create_celebahq of {CELEBAHQ_URL} (or use a data256x256/ export)"
                if self.download:
                    raise DownloadError(f"CelebA-HQ cannot be downloaded automatically: {how}; then pass "
                                        "--data.download false")  # fmt: skip
                raise DatasetError(f"CelebA-HQ not found: {len(found)} images in {self.folder}; {how}")
            found.sort(key=os.path.basename)
            if self.check_files:
                check_images(found)
            self._paths = found
        return self._paths

    def load_split(self, train: bool) -> ImageFiles:
        paths = self.paths()
        cut = len(paths) - num_test_images(len(paths))
        chosen = paths[:cut] if train else paths[cut:]
        return ImageFiles(chosen, [-1] * len(chosen), self.num_channels, self.image_size)
