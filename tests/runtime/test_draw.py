"""draw_boxes: every box a model can emit is drawn, none crashes the report or `ground --draw`."""

from PIL import Image

from egm_edge.runtime.draw import draw_boxes


def test_swapped_corners_and_missing_boxes_are_drawn():
    img = Image.new("RGB", (120, 80), (255, 255, 255))
    out = draw_boxes(img, [((90, 60, 20, 10), "swapped", (255, 0, 0)), (None, "none", (0, 0, 255)),
                           ((10, 10, 40, 30), "ok", (0, 255, 0))], width=1)
    assert out.size == img.size and out is not img
    assert out.getpixel((20, 50)) == (255, 0, 0) and out.getpixel((90, 50)) == (255, 0, 0)  # left and right edges of 20..90
    assert img.getpixel((20, 50)) == (255, 255, 255)  # the input is untouched
