"""Output-space discriminator of the adversarial warm-up (reference §5).

The released IAST ``FCDiscriminator`` (AdaptSegNet's, with a 3x3 first layer): a
fully convolutional classifier of softmax maps, each conv halving the resolution.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.labels import NUM_CLASSES


class OutputSpaceDiscriminator(nn.Module):
    """Softmax map (N, K, H, W) → domain scores (N, 1, ⌊⌈H/2⌉/16⌋, ⌊⌈W/2⌉/16⌋).

    conv 3x3 s2 K→64, then 4x4 s2 convs 64→128→256→512→1, LeakyReLU(0.2) after every
    conv but the last. The scores are raw (no sigmoid): the LSGAN losses regress them
    to the domain labels. Layer names are the released code's, so the state dict of its
    ``discriminators.Origin-Predictor`` loads as it is.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, 64, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(64, 128, kernel_size=4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 256, kernel_size=4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(256, 512, kernel_size=4, stride=2, padding=1)
        self.classifier = nn.Conv2d(512, 1, kernel_size=4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, softmax_map: Tensor) -> Tensor:
        x = softmax_map
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.leaky_relu(conv(x))
        return self.classifier(x)
