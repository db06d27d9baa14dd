"""Draw boxes with labels on an image (pillow only): for `ground --draw`, the demo and validation reports."""

from __future__ import annotations

from PIL import Image, ImageDraw


def draw_boxes(image: Image.Image, boxes, width: int | None = None) -> Image.Image:
    """boxes: iterable of (box (x1, y1, x2, y2) pixels or None, label, rgb colour). Returns a new RGB image."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    w = width or max(2, round(min(out.size) / 150))
    y_text = 2
    for box, label, colour in boxes:
        if box is None:
            d.text((4, y_text), f"{label}: no box", fill=colour)
            y_text += 12
            continue
        # A model can emit a box with its corners swapped (x2 < x1): draw the rectangle it spans, not crash.
        (x1, x2), (y1, y2) = sorted((box[0], box[2])), sorted((box[1], box[3]))
        d.rectangle((x1, y1, x2, y2), outline=colour, width=w)
        if label:
            ty = y1 - 12 if y1 >= 12 else y2 + 2
            tw = d.textlength(label)
            d.rectangle((x1, ty, x1 + tw + 4, ty + 12), fill=colour)
            d.text((x1 + 2, ty), label, fill=(255, 255, 255))
    return out
