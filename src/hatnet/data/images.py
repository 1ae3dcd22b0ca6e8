"""The one image reader: files, PIL images and numpy arrays -> 8-bit RGB, as the image is meant to be seen.

* EXIF orientation is applied (a phone photo stored sideways comes out upright), here and in
  :func:`image_size`, so the size checks of the datasets see the same image the models do.
* 16-bit images are scaled to 8 bits (by 1/257, so that white stays white), float images in [0, 1] by 255;
  grayscale, palette, RGBA and CMYK images become RGB (an alpha channel is dropped, as ImageFolder does).
* Pillow's decompression-bomb rule holds: an image of more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels
  is refused (raise that limit to read larger images).
* Every unreadable file is one error, ``cannot read image PATH: reason``: :class:`InputError` by default,
  the datasets ask for :class:`DatasetError`. The datasets check every file when they are built
  (:func:`check_image_file`, :func:`image_size`: the header and what Pillow can verify without decoding), so
  a broken file stops a run before its first step, not in the middle of an evaluation.
"""
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Type, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from ..errors import HatNetError, InputError

__all__ = ['IMAGE_EXTENSIONS', 'VIDEO_EXTENSIONS', 'Frame', 'ImageSource', 'check_image_file', 'find_images',
           'image_size', 'read_image', 'read_image_tensor']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
VIDEO_EXTENSIONS = ('.mp4', '.m4v', '.mov', '.avi', '.mkv', '.webm')
GLOB_CHARACTERS = set('*?[')


@dataclass(frozen=True)
class Frame:
    """Frame ``index`` (0-based, in the order the video shows them) of the video file ``path``: an image
    source like a file path, read with PyAV (the ``video`` extra)."""
    path: Path
    index: int

    def __str__(self) -> str:
        return f'{self.path}#frame={self.index}'

    @property
    def name(self) -> str:
        return f'{self.path.name}#frame={self.index}'

    @property
    def stem(self) -> str:
        """What outputs named after it are called: ``clip_000030``."""
        return f'{self.path.stem}_{self.index:06d}'


ImageSource = Union[str, Path, Frame, Image.Image, np.ndarray]

EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 degrees: width and height swap
# modes whose values need scaling to 8 bits (Pillow's convert('RGB') would clip them)
WIDE_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')


def read_image(source: ImageSource, error: Type[HatNetError] = InputError) -> Image.Image:
    """An RGB PIL image (8 bits per channel) from a file path, a PIL image or an (H, W) / (H, W, C) array."""
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, 'the array', error)
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source), 'the PIL image', error)
    if isinstance(source, Frame):
        return _VIDEOS.read(source, error)
    if not isinstance(source, (str, Path)):
        raise error(f'cannot read image {source!r}: expected a file path, a PIL image or a numpy array')
    with _open(source, error) as image:
        try:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image), source, error)
        except HatNetError:  # already one message naming the file
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise error(f'cannot read image {source}: {e}') from None


def read_image_tensor(source: ImageSource, error: Type[HatNetError] = InputError) -> torch.Tensor:
    """:func:`read_image` as a uint8 (3, H, W) ``tv_tensors.Image``."""
    return tv_tensors.Image(pil_to_tensor(read_image(source, error)))


def find_images(inputs: Sequence[Union[str, Path]], frame_stride: int = 1) -> List[Union[Path, Frame]]:
    """The images that command-line inputs name, in order, each once: a file is itself; a video file
    (``VIDEO_EXTENSIONS``) every ``frame_stride``-th of its frames; a folder is every image below it (sorted,
    any depth, hidden files and folders left out); a pattern such as ``'photos/*.jpg'`` or ``'data/**/*.png'``
    (quoted, so that hatnet expands it) its matches. A missing input, or one that names no image, is an
    InputError."""
    found: List[Union[Path, Frame]] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
            files = _VIDEOS.frames(path, frame_stride)
            what = f'video {path}'
        elif path.is_dir():
            files = sorted(p for p in path.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                           and not any(part.startswith('.') for part in p.relative_to(path).parts))
            what = f'folder {path}'
        elif path.exists():
            files = [path]
        elif GLOB_CHARACTERS & set(item):
            files = sorted(Path(p) for p in glob.glob(item, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file())
            what = f'pattern {item!r}'
        else:
            raise InputError(f'no such file or folder: {item}')
        if not files:
            raise InputError(f'{what} matches no image ({", ".join(IMAGE_EXTENSIONS)})')
        found += files
    return list(dict.fromkeys(found))


def check_image_file(path, error: Type[HatNetError] = InputError) -> None:
    """Check that ``path`` is an image Pillow can read, without decoding it: its header, and what Pillow's
    ``verify()`` checks (for PNG the checksum of every chunk, which finds truncated and damaged files)."""
    with _open(path, error) as image:
        try:
            image.verify()
        except Exception as e:  # Pillow's plugins raise many types here (OSError, SyntaxError, struct.error, ...)
            raise error(f'cannot read image {path}: {e or type(e).__name__}') from None


def image_size(path, error: Type[HatNetError] = InputError) -> Tuple[int, int]:
    """(width, height) of an image file as :func:`read_image` returns it, after :func:`check_image_file`."""
    check_image_file(path, error)
    with _open(path, error) as image:
        try:
            width, height = image.size
            transposed = image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS
        except Exception as e:  # reading the EXIF data of some formats decodes the image
            raise error(f'cannot read image {path}: {e or type(e).__name__}') from None
        return (height, width) if transposed else (width, height)


def _open(path, error: Type[HatNetError]) -> Image.Image:
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise error(f'cannot read image {path}: not an image, or a format Pillow cannot decode') from None
    except Image.DecompressionBombError as e:
        raise error(f'cannot read image {path}: {e}') from None
    except OSError as e:
        raise error(f'cannot read image {path}: {e.strerror or e}') from None


def _to_rgb(image: Image.Image, name, error: Type[HatNetError]) -> Image.Image:
    if image.mode == 'RGB':
        return image
    if image.mode in WIDE_MODES:
        return _array_to_rgb(np.asarray(image), name, error)
    if image.mode == 'P' and 'transparency' in image.info:
        image = image.convert('RGBA')  # Pillow's advice for palette transparency; the alpha is dropped next
    try:
        return image.convert('RGB')
    except ValueError as e:
        raise error(f'cannot read image {name}: {image.mode} images cannot be converted to RGB ({e})') from None


def _array_to_rgb(array: np.ndarray, name, error: Type[HatNetError]) -> Image.Image:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of 8-bit, 16-bit or [0, 1] float values -> RGB."""
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        channels = array.shape[-1]
    elif array.ndim == 2:
        channels = 1
    else:
        raise error(f'cannot read image {name}: expected an (H, W) or (H, W, 3) array, got shape {array.shape}')
    pixels = _to_uint8(array, name, error)
    if channels == 1:
        return Image.fromarray(pixels.reshape(pixels.shape[:2])).convert('RGB')
    return Image.fromarray(pixels, 'RGBA' if channels == 4 else 'RGB').convert('RGB')


def _to_uint8(array: np.ndarray, name, error: Type[HatNetError]) -> np.ndarray:
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if kind == 'b':
        return array.astype(np.uint8) * 255
    if kind == 'f':
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise error(f'cannot read image {name}: float images must hold values in [0, 1], this one has '
                        f'{array.min():.4g} .. {array.max():.4g}')
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    if kind in 'iu':
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise error(f'cannot read image {name}: integer values must lie in 0 .. 65535 (16 bits), this image '
                        f'has {low} .. {high}')
        if array.dtype.itemsize == 1 or (high <= 255 and array.dtype != np.uint16):
            return array.astype(np.uint8)  # wider integer arrays of 8-bit values
        # 16 bits -> 8 bits: 65535 / 257 = 255, rounded to the nearest value
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    raise error(f'cannot read image {name}: unsupported pixel type {array.dtype}')


class _VideoReader:
    """Frames of one video at a time, decoded forward from where the last read stopped: reading the frames of
    a video in order (as the predict commands do, twice) decodes it once per pass."""

    def __init__(self):
        self.path, self.container, self.decoded, self.next_index = None, None, None, 0

    def _open(self, path: Path, error):
        av = _import_av(error)
        self.close()
        try:
            self.container = av.open(str(path))
            self.decoded = self.container.decode(video=0)
        except (av.FFmpegError, IndexError, OSError) as e:
            self.close()
            raise error(f'cannot read video {path}: {e}') from None
        self.path, self.next_index = path, 0

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.path, self.container, self.decoded, self.next_index = None, None, None, 0

    def frames(self, path: Path, stride: int) -> List[Frame]:
        """Every ``stride``-th frame of the video (it is decoded once to count them: containers do not all
        store the count)."""
        self._open(path, InputError)
        count = sum(1 for _ in self.decoded)
        self.close()
        return [Frame(path, index) for index in range(0, count, stride)]

    def read(self, frame: Frame, error) -> Image.Image:
        if frame.path != self.path or frame.index < self.next_index:
            self._open(frame.path, error)
        try:
            for decoded in self.decoded:
                self.next_index += 1
                if self.next_index - 1 == frame.index:
                    return decoded.to_image().convert('RGB')
        except Exception as e:  # PyAV's decoding errors
            raise error(f'cannot read {frame}: {e}') from None
        raise error(f'cannot read {frame}: the video has only {self.next_index} frames')


def _import_av(error):
    try:
        import av
    except ImportError:
        raise error("reading videos needs PyAV, which is not installed: pip install 'hatnet[video]'") from None
    return av


_VIDEOS = _VideoReader()
