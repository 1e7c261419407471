"""Runs INSIDE the isolated tflite-support environment (see export/tflite_support_env.py), never in the
project's venv: tflite-support needs protobuf<4, which the project's onnx cannot live with.

Standard library + numpy + tflite_support only. Usage: python _tflite_support_worker.py COMMAND, with a
JSON request on stdin and a JSON reply on stdout:
  probe           -> {"tflite_support": version}
  write-metadata  {src, dst, name, description, version, author, license, mean, std, color_space,
                   input_description, output_description, embedding_dim} -> {"metadata": json}
  read-metadata   {model} -> {"metadata": json or null}
  embed           {model, pixels (.npy of uint8 (N,H,W,3)), out (.npy), threads, repeats}
                  -> {"ms_per_image": float}  (tflite-support's ImageEmbedder, raw float vectors)
"""

import json
import os
import sys
import time

# Run as a script, Python puts this file's folder (export/) first on sys.path, where export/onnx.py,
# export/tflite.py, ... would shadow real packages: drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def probe(req):
    import tflite_support

    return {"tflite_support": getattr(tflite_support, "__version__", "?")}


def write_metadata(req):
    from tensorflow_lite_support.metadata import metadata_schema_py_generated as fb
    from tensorflow_lite_support.metadata.python.metadata_writers import metadata_info, metadata_writer, writer_utils

    buf = writer_utils.load_file(req["src"])
    general = metadata_info.GeneralMd(name=req["name"], description=req["description"], version=req["version"],
                                      author=req["author"], licenses=req["license"])
    color = {"RGB": fb.ColorSpaceType.RGB, "GRAYSCALE": fb.ColorSpaceType.GRAYSCALE}.get(
        req["color_space"], fb.ColorSpaceType.UNKNOWN)
    image = metadata_info.InputImageTensorMd(
        name="image", description=req["input_description"], norm_mean=list(req["mean"]), norm_std=list(req["std"]),
        color_space_type=color, tensor_type=writer_utils.get_input_tensor_types(buf)[0])
    embedding = metadata_info.TensorMd(name="embedding", description=req["output_description"])
    writer = metadata_writer.MetadataWriter.create_from_metadata_info(
        buf, general_md=general, input_md=[image], output_md=[embedding])
    writer_utils.save_file(writer.populate(), req["dst"])
    return {"metadata": json.loads(writer.get_populated_metadata_json())}


def read_metadata(req):
    from tensorflow_lite_support.metadata.python import metadata as md

    displayer = md.MetadataDisplayer.with_model_file(req["model"])
    return {"metadata": json.loads(displayer.get_metadata_json())}


def embed(req):
    import numpy as np
    from tflite_support.task import core, processor, vision

    options = vision.ImageEmbedderOptions(
        base_options=core.BaseOptions(file_name=req["model"], num_threads=int(req.get("threads", 1))),
        embedding_options=processor.EmbeddingOptions(l2_normalize=False, quantize=False))
    embedder = vision.ImageEmbedder.create_from_options(options)
    pixels = np.load(req["pixels"])
    images = [vision.TensorImage.create_from_array(np.ascontiguousarray(p)) for p in pixels]
    out = np.stack([np.asarray(embedder.embed(t).embeddings[0].feature_vector.value, np.float32) for t in images])
    np.save(req["out"], out)
    repeats = int(req.get("repeats", 0))
    ms = None
    if repeats:
        for t in images[:2]:
            embedder.embed(t)
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            embedder.embed(images[r % len(images)])
            times.append(time.perf_counter() - t0)
        ms = 1000 * sorted(times)[len(times) // 2]
    return {"ms_per_image": ms}


COMMANDS = {"probe": probe, "write-metadata": write_metadata, "read-metadata": read_metadata, "embed": embed}

if __name__ == "__main__":
    request = json.loads(sys.stdin.read() or "{}")
    reply = COMMANDS[sys.argv[1]](request)
    sys.stdout.write("\n@@REPLY@@" + json.dumps(reply))
