"""FastGAN per weak class: the model (`fastgan`), its single-GAN train step (`step`), and the
ensemble that trains one GAN per class in one compiled program."""
