"""The paper's two body regions (Table 3): the structures kept from TotalSegmentator's 'total' task, the HU
window, and the pad and crop boxes. Sizes are (D, H, W) = (z, y, x); the paper writes them x × y × z, so its
"240x240x120 pad, 192x192x96 crop" is (120, 240, 240) and (96, 192, 192) here.

A region's structures are its mask labels 1..n (0 is background), in this order.
"""

# fmt: off
REGIONS = {
    "chest": dict(window=(-1000, 200), pad=(120, 240, 240), crop=(96, 192, 192), structures=(
        "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
        "lung_middle_lobe_right", "lung_lower_lobe_right", "heart")),
    "abdomen": dict(window=(-150, 250), pad=(192, 256, 256), crop=(160, 192, 176), structures=(
        "liver", "spleen", "kidney_left", "kidney_right", "bowel")),
}
# fmt: on
MERGED = {"bowel": ("esophagus", "stomach", "duodenum", "small_bowel", "colon")}  # TotalSegmentator classes
