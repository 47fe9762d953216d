"""IMU traces of the generated world: what a sensor strapped to the object would record.

Introduced in `00_tour.ipynb`. Six channels over `steps` samples of the clip:

- accelerometer x, y, z (in g): a moving object speeds up, then slows down along its direction
  (one positive and one negative lobe); z carries gravity;
- gyroscope x, y, z (rad/s): the object tilts while it moves, and every axis carries a bias that
  drifts with temperature, as real MEMS gyroscopes do (cold reads low, hot reads high).
"""

from __future__ import annotations

import numpy as np

from mmlib.data.world import DIRECTIONS, Scenes, noise

ACCELERATION = 0.5  # peak acceleration of a move, in g
TILT_RATE = 0.6  # peak tilt rate while moving, rad/s
GYRO_BIAS = (-0.3, 0.0, 0.3)  # gyroscope bias of cold, warm and hot objects, rad/s
NOISE = 0.05  # sensor noise on every channel


def render_imu(scenes: Scenes, steps: int, seed: int) -> np.ndarray:
    """IMU traces (B, 6, steps) float32 for a batch of scenes."""
    t = (np.arange(steps, dtype=np.float32) + 0.5) / steps  # (T,) clip time
    push = np.sin(2 * np.pi * t)  # (T,) speed up then slow down: a = x'' of a smooth move
    tilt = np.sin(np.pi * t)  # (T,) tilt rate peaks mid-move
    direction = DIRECTIONS[scenes.attributes["motion"]] * np.array([1, -1], dtype=np.float32)  # y up
    gain = scenes.gain[:, None]

    trace = np.zeros((len(scenes), 6, steps), dtype=np.float32)
    trace[:, 0] = ACCELERATION * gain * direction[:, 0:1] * push  # x: left/right
    trace[:, 1] = ACCELERATION * gain * direction[:, 1:2] * push  # y: up/down
    trace[:, 2] = 1.0  # z: gravity
    trace[:, 3] = TILT_RATE * gain * direction[:, 1:2] * tilt  # roll while moving up/down
    trace[:, 4] = TILT_RATE * gain * direction[:, 0:1] * tilt  # pitch while moving left/right
    bias = np.asarray(GYRO_BIAS, dtype=np.float32)[scenes.attributes["temperature"]]
    trace[:, 3:6] += bias[:, None, None]
    trace += NOISE * noise(seed, scenes.noise_key, "imu", 6 * steps).reshape(len(scenes), 6, steps)
    return trace.astype(np.float32)
