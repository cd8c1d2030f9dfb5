"""mdjax: mistake-driven image classification in JAX.

Train a classifier, find its worst classes on a validation split, train one FastGAN per weak
class (all of them in one compiled program), add their samples to the training set and fine-tune.
"""

__version__ = "0.1.0"
