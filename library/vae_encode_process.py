"""The VAE encoding of latent caching in a child process.

On CPU, what a compiled graph's kernels used stays in MindSpore's host memory pool after the model and its
graphs are deleted (Limitations.md, "Graph-mode memory on CPU"): the latent caching of a training run
would leave that memory under the training steps. ``EncoderProcess`` runs the same segmented encoder
(``vae_segments.SegmentedEncode``) in a spawned process that holds a copy of the VAE's encoder weights;
the memory goes with the process when the caching is done. The graphs are the same, so the latents are
equal to the in-process encoding's (tests).
"""
import multiprocessing
import traceback

import numpy as np

# parameter names that the encoding reads (the decoder's stay in the parent)
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def _encoder_cells(config):
    """The encoding half of ``AutoencoderKL``, with its parameter names."""
    from mindspore import nn

    from library.autoencoder_kl import Encoder
    from library.layers import Conv2d

    class EncoderOnly(nn.Cell):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder(config)
            self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
            self.latent_channels = config.latent_channels

    return EncoderOnly()


def _serve(conn, config, weights, device_target, pynative):
    """Child: encode each image batch received until ``None`` arrives; reply (mean, logvar) float32 numpy,
    or ("error", traceback text)."""
    try:
        from library.device_utils import setup_device

        setup_device(device_target, pynative=pynative)
        import mindspore as ms

        from library.vae_segments import SegmentedEncode

        cells = _encoder_cells(config)
        cells.set_train(False)
        params = {p.name: p for p in cells.get_parameters()}
        for name, (array, dtype_name) in weights.items():
            dtype = getattr(ms, dtype_name)
            params[name].set_dtype(dtype)
            params[name].set_data(ms.Tensor(array).astype(dtype))
        del weights
        dtype = next(iter(params.values())).dtype
        encoder = SegmentedEncode(cells)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        images = conn.recv()
        if images is None:
            return
        try:
            mean, logvar = encoder(ms.Tensor(images).astype(dtype))
            conn.send((mean.astype(ms.float32).asnumpy(), logvar.astype(ms.float32).asnumpy()))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class EncoderProcess:
    """``images`` (float32 numpy, B x 3 x H x W) -> (mean, logvar) float32 numpy, computed in a child process
    that starts on the first call with the VAE's encoder weights as they are then. ``close`` ends it."""

    def __init__(self, vae):
        self.vae = vae
        self._conn = self._process = None

    def _start(self):
        import mindspore as ms

        weights = {}
        for p in self.vae.get_parameters():
            if p.name.startswith(ENCODER_PREFIXES):
                # numpy has no bfloat16: sent as float32 and cast back in the child
                array = p.asnumpy() if p.dtype in (ms.float32, ms.float16) else p.astype(ms.float32).asnumpy()
                weights[p.name] = (array, str(p.dtype).lower())
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, name="vae-encode", daemon=True,
            args=(child_conn, self.vae.config, weights, ms.get_context("device_target"),
                  ms.get_context("mode") == ms.PYNATIVE_MODE))
        self._process.start()
        child_conn.close()
        self._reply()

    def _died(self):
        self._process.join(5)
        code = self._process.exitcode
        self.close()
        return RuntimeError(f"the VAE encoding process ended unexpectedly (exit code {code}; out of memory?)")

    def _reply(self):
        try:
            reply = self._conn.recv()
        except EOFError:
            raise self._died() from None
        if isinstance(reply[0], str) and reply[0] == "error":
            self.close()
            raise RuntimeError(f"VAE encoding process failed:\n{reply[1]}")
        return reply

    def __call__(self, images: np.ndarray):
        if self._process is None:
            self._start()
        try:
            self._conn.send(np.ascontiguousarray(images, np.float32))
        except (BrokenPipeError, ConnectionResetError):
            raise self._died() from None
        return self._reply()

    def close(self):
        """End the child (no-op when it never started)."""
        if self._process is None:
            return
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        self._conn = self._process = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
