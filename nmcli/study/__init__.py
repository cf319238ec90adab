"""The studies behind `nmsparse study`: which recipe, at which sparsity. mnist.py (every recipe from 2:4 to 1:32 on
a small ViT) and pretrained.py (recovery of a pretrained Hugging Face model at equal steps and equal FLOPs) run
training through pool.py; mnist_page.py and pretrained_page.py write their results pages from page.py's parts."""
