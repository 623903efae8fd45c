"""Small networks shared by the merge tests and benchmark."""

import torch.nn as nn
import torch.nn.functional as F


class ResCNN(nn.Module):
    """Two residual stages with BatchNorm and a strided 1x1 shortcut (8x8 inputs)."""

    def __init__(self, width=8, classes=10, cin=1):
        super().__init__()
        w = width
        self.c1, self.b1 = nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w)
        self.c2, self.b2 = nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w)
        self.c3, self.b3 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w)
        self.c4, self.b4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.sc = nn.Conv2d(w, 2 * w, 1, stride=2)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = x + F.relu(self.b2(self.c2(x)))
        x = self.sc(x) + F.relu(self.b3(self.c3(x)))
        x = x + F.relu(self.b4(self.c4(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mlp(din=64, hidden=64, classes=10, layernorm=False):
    layers = [nn.Linear(din, hidden), nn.ReLU(), nn.Linear(hidden, hidden)]
    if layernorm:
        layers.append(nn.LayerNorm(hidden))
    layers += [nn.ReLU(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)
