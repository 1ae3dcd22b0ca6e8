"""The one image reader: orientation, bit depths, colour modes, arrays, unreadable files."""
import numpy as np
import pytest
from PIL import Image

from hatnet.data.images import image_size, read_image, read_image_tensor
from hatnet.errors import DatasetError, InputError

RED, BLUE = (220, 30, 30), (30, 30, 220)


@pytest.fixture
def sideways_jpeg(tmp_path):
    """A 40 x 20 (width x height) JPEG, red left half, blue right half, whose EXIF says 'rotate 90 degrees
    clockwise to display' (orientation 6): it is shown 20 wide and 40 high, red on top."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / 'sideways.jpg'
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def _mean_colour(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(-1, 3).mean(0)


def test_exif_orientation_gives_the_displayed_image(sideways_jpeg):
    image = read_image(sideways_jpeg)
    assert image.mode == 'RGB' and image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert np.abs(_mean_colour(pixels[:18]) - RED).max() < 10
    assert np.abs(_mean_colour(pixels[22:]) - BLUE).max() < 10
    assert image_size(sideways_jpeg) == (20, 40)  # the size checks of the datasets see the same
    # the same image opened by the caller is turned the same way
    assert np.array_equal(np.asarray(read_image(Image.open(sideways_jpeg))), np.asarray(image))
    assert read_image_tensor(sideways_jpeg).shape == (3, 40, 20)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(3, 0)
    Image.fromarray(values).save(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode == 'I;16'
    pixels = np.asarray(read_image(tmp_path / 'deep.png'))
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (pixels == pixels[..., :1]).all()  # grey stays grey
    assert np.array_equal(np.asarray(read_image(values)), pixels)


def test_grayscale_palette_and_rgba_become_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / 'grey.png')
    assert np.array_equal(np.asarray(read_image(tmp_path / 'grey.png')), np.repeat(grey[..., None], 3, 2))

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = RED, 0  # fully transparent: the colour stays, the alpha goes
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    assert (np.asarray(read_image(tmp_path / 'rgba.png')) == RED).all()
    assert (np.asarray(read_image(rgba)) == RED).all()

    palette = Image.new('P', (4, 3))
    palette.putpalette([*RED, *BLUE])
    palette.putpixel((1, 1), 1)
    pixels = np.asarray(read_image(palette))
    assert tuple(pixels[0, 0]) == RED and tuple(pixels[1, 1]) == BLUE


def test_arrays(tmp_path):
    colour = np.full((5, 6, 3), 100, np.uint8)
    assert read_image(colour).size == (6, 5)
    assert (np.asarray(read_image(colour[..., :1])) == 100).all()
    assert (np.asarray(read_image(np.full((5, 6), 0.5, np.float32))) == 128).all()
    assert (np.asarray(read_image(np.ones((5, 6), bool))) == 255).all()
    with pytest.raises(InputError, match=r'float images must hold values in \[0, 1\]'):
        read_image(np.full((5, 6, 3), 200.))
    with pytest.raises(InputError, match=r'expected an \(H, W\) or \(H, W, 3\) array, got shape \(2, 5, 6, 3\)'):
        read_image(np.zeros((2, 5, 6, 3), np.uint8))


def test_unreadable_files_are_one_error_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / 'notes.png').write_text('not an image')
    with pytest.raises(InputError, match=f'cannot read image {tmp_path}/notes.png: not an image'):
        read_image(tmp_path / 'notes.png')
    with pytest.raises(InputError, match=f'cannot read image {tmp_path}/missing.jpg: No such file'):
        read_image(str(tmp_path / 'missing.jpg'))
    with pytest.raises(DatasetError, match='notes.png'):  # the datasets' kind of error
        read_image(tmp_path / 'notes.png', DatasetError)

    Image.new('RGB', (64, 64)).save(tmp_path / 'large.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # Pillow refuses more than twice its limit
    with pytest.raises(InputError, match=f'cannot read image {tmp_path}/large.png: .*decompression bomb'):
        read_image(tmp_path / 'large.png')
    with pytest.raises(InputError, match='large.png'):
        image_size(tmp_path / 'large.png')

    truncated = tmp_path / 'truncated.jpg'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    with pytest.raises(InputError, match='cannot read image .*truncated.jpg'):
        read_image(truncated)


def test_find_images_expands_folders_and_patterns_and_names_what_is_missing(tmp_path):
    from hatnet.data.images import find_images
    for name in ('b/2.png', 'a/1.JPG', 'a/notes.txt', '.cache/3.png', 'a/.hidden.png', 'c/d/4.webp'):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b'')
    assert find_images([tmp_path]) == [tmp_path / p for p in ('a/1.JPG', 'b/2.png', 'c/d/4.webp')]
    assert find_images([str(tmp_path / '**' / '*.png'), tmp_path / 'b' / '2.png']) == [tmp_path / 'b/2.png']
    with pytest.raises(InputError, match='no such file or folder'):
        find_images([tmp_path / 'missing.png'])
    with pytest.raises(InputError, match='matches no image'):
        find_images([str(tmp_path / '*.gif')])


def write_video(path, colours, size=(48, 32)):
    """A short MPEG-4 video whose frame i is filled with colours[i]."""
    av = pytest.importorskip('av')
    with av.open(str(path), mode='w') as container:
        stream = container.add_stream('mpeg4', rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], 'yuv420p'
        for colour in colours:
            pixels = np.full((size[1], size[0], 3), colour, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format='rgb24')))
        container.mux(stream.encode())
    return path


def test_video_frames_are_inputs_read_in_any_order(tmp_path):
    from hatnet.data.images import Frame, find_images
    colours = [(20 * i, 255 - 20 * i, 128) for i in range(12)]
    video = write_video(tmp_path / 'clip.mp4', colours)
    frames = find_images([video], frame_stride=5)
    assert frames == [Frame(video, 0), Frame(video, 5), Frame(video, 10)]
    assert str(frames[1]) == f'{video}#frame=5' and frames[1].stem == 'clip_000005'
    for frame in (frames[2], frames[0], frames[1], frames[1]):  # backwards and again: each its own picture
        picture = np.asarray(read_image(frame)).reshape(-1, 3).mean(0)
        assert np.abs(picture - colours[frame.index]).max() < 12, (frame, picture)
    with pytest.raises(InputError, match='has only 12 frames'):
        read_image(Frame(video, 12))
    (tmp_path / 'broken.mp4').write_bytes(b'not a video')
    with pytest.raises(InputError, match='cannot read video'):
        find_images([tmp_path / 'broken.mp4'])
