"""Pictures of predictions that a person reads without zooming in: text sized to the image, on filled labels.

Pillow's built-in font scales (``ImageFont.load_default(size)``), so no font file is needed. Sizes follow the
picture's shorter side, so a label is as readable on a 64 px thumbnail as on a 4000 px photo.
"""
from typing import Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

Colour = Tuple[int, int, int]
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def font_for(size: Tuple[int, int], fraction: float = 0.035, smallest: int = 12) -> ImageFont.ImageFont:
    """A font whose height is ``fraction`` of the picture's shorter side, at least ``smallest`` px."""
    return ImageFont.load_default(max(smallest, round(fraction * min(size))))


def text_colour(background: Colour) -> Colour:
    """Black or white, whichever reads better on ``background`` (by its luma)."""
    red, green, blue = background
    return BLACK if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else WHITE


def draw_label(draw: ImageDraw.ImageDraw, xy: Tuple[float, float], text: str, background: Colour,
               font: ImageFont.ImageFont, bounds: Tuple[int, int]) -> None:
    """``text`` on a filled box whose top-left corner is ``xy``, moved inside a picture of size ``bounds``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    width, height = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0, xy[0]), max(0, bounds[0] - width))
    y = min(max(0, xy[1]), max(0, bounds[1] - height))
    draw.rectangle((x, y, x + width, y + height), fill=background)
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=text_colour(background))


def add_legend(picture: Image.Image, entries: Sequence[Tuple[str, Colour]]) -> Image.Image:
    """``picture`` with a legend below it: a colour swatch and a name per entry, wrapped into rows."""
    font = font_for(picture.size, fraction=0.04)
    measure = ImageDraw.Draw(picture)
    line = measure.textbbox((0, 0), 'Ag', font=font)[3]
    swatch, gap = line, line // 2
    widths = [swatch + gap // 2 + measure.textlength(name, font=font) + 2 * gap for name, _ in entries]
    rows, x = [[]], 0.
    for entry, width in zip(entries, widths):
        if rows[-1] and x + width > picture.width:
            rows.append([])
            x = 0.
        rows[-1].append((entry, x))
        x += width
    legend_height = len(rows) * (line + gap) + gap
    canvas = Image.new('RGB', (picture.width, picture.height + legend_height), WHITE)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row_index, row in enumerate(rows):
        y = picture.height + gap + row_index * (line + gap)
        for (name, colour), x in row:
            draw.rectangle((x + gap, y, x + gap + swatch, y + swatch), fill=tuple(colour), outline=BLACK)
            draw.text((x + gap + swatch + gap // 2, y), name, font=font, fill=BLACK)
    return canvas


def bars_picture(picture: Image.Image, labels: Sequence[str], scores: Sequence[float],
                 height: int = 384) -> Image.Image:
    """The image (scaled to ``height``) with a bar per label to its right: the top-k of a classification."""
    scale = height / picture.height
    image = picture.resize((max(1, round(picture.width * scale)), height), Image.Resampling.BILINEAR)
    font = font_for((height, height), fraction=0.045)
    panel = round(0.9 * height)
    canvas = Image.new('RGB', (image.width + panel, height), WHITE)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    row = height / max(1, len(labels))
    line = draw.textbbox((0, 0), 'Ag', font=font)[3]
    margin = line // 2
    for rank, (label, score) in enumerate(zip(labels, scores)):
        top = rank * row + margin
        draw.text((image.width + margin, top), f'{label}  {100 * score:.1f} %', font=font, fill=BLACK)
        bar_top = top + line + margin // 2
        bar_bottom = min(top + row - margin, bar_top + line)
        full = panel - 2 * margin
        draw.rectangle((image.width + margin, bar_top, image.width + margin + full, bar_bottom), fill=(230, 230, 230))
        draw.rectangle((image.width + margin, bar_top, image.width + margin + max(1, round(full * score)), bar_bottom),
                       fill=(31, 119, 180) if rank == 0 else (120, 160, 200))
    return canvas
