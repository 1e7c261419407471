// The bundle's preprocessing spec (sdk/preprocess.py, contract 1 of ARCHITECTURE.md) in JavaScript.
//
// Geometry follows `resize_image` and the resampling is a port of Pillow's ImagingResample
// (src/libImaging/Resample.c: separable convolution, 22-bit fixed-point coefficients, uint8 between
// the horizontal and the vertical pass) and of its nearest-neighbour path (Geometry.c,
// ImagingScaleAffine), so decoded RGB pixels become the same uint8 crop and the same float32 tensor
// as in Python. Pure functions over typed arrays: the page runs them, and so does node in the tests.

const PRECISION_BITS = 22; // 32 - 8 - 2, as Pillow

const FILTERS = {
  bilinear: {
    support: 1.0,
    fn: (x) => {
      if (x < 0.0) x = -x;
      return x < 1.0 ? 1.0 - x : 0.0;
    },
  },
  bicubic: {
    support: 2.0,
    fn: (x) => {
      const a = -0.5;
      if (x < 0.0) x = -x;
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
  },
};

/** Python's round(): half to even (JavaScript's Math.round goes half up). */
export function pyRound(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** Check a manifest preprocessing entry and fill the defaults of PreprocessSpec. */
export function parseSpec(raw) {
  const spec = {
    input_size: [224, 224],
    resize: "shorter",
    crop_pct: 1.0,
    interpolation: "bilinear",
    mean: [0.485, 0.456, 0.406],
    std: [0.229, 0.224, 0.225],
    channel_order: "RGB",
    layout: "NCHW",
    value_range: 255.0,
    ...raw,
  };
  const [h, w] = spec.input_size;
  const problems = [];
  if (!(h > 0 && w > 0)) problems.push(`input_size ${spec.input_size}`);
  if (!["shorter", "exact"].includes(spec.resize)) problems.push(`resize '${spec.resize}'`);
  if (!(spec.crop_pct > 0 && spec.crop_pct <= 1)) problems.push(`crop_pct ${spec.crop_pct}`);
  if (!["bilinear", "bicubic", "nearest"].includes(spec.interpolation)) {
    problems.push(`interpolation '${spec.interpolation}'`);
  }
  if (!["RGB", "BGR"].includes(spec.channel_order)) problems.push(`channel_order '${spec.channel_order}'`);
  if (!["NCHW", "NHWC"].includes(spec.layout)) problems.push(`layout '${spec.layout}'`);
  if (problems.length) throw new Error(`unsupported preprocessing in the bundle manifest: ${problems.join(", ")}`);
  return spec;
}

/** resize_image's geometry: the resized size (nw, nh) and the crop box inside it. */
export function geometry(width, height, spec) {
  const [th, tw] = spec.input_size;
  if (spec.resize === "exact") return { nw: tw, nh: th, left: 0, top: 0, tw, th };
  const scale = Math.max(th, tw) / spec.crop_pct / Math.min(width, height);
  const nw = Math.max(tw, pyRound(width * scale));
  const nh = Math.max(th, pyRound(height * scale));
  return { nw, nh, left: Math.floor((nw - tw) / 2), top: Math.floor((nh - th) / 2), tw, th };
}

function precomputeCoeffs(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const kk = new Int32Array(outSize * ksize);
  const bounds = new Int32Array(outSize * 2);
  const k = new Float64Array(ksize);
  const ss = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = filter.fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const v = ww !== 0.0 ? k[x] / ww : k[x];
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS)) : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[2 * xx] = xmin;
    bounds[2 * xx + 1] = xmax;
  }
  return { ksize, kk, bounds };
}

function clip8(v) {
  v >>= PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// Horizontal pass over rows [y0, y0 + rows) of an image with `cin` channels per pixel; out: RGB.
function resampleHorizontal(src, width, cin, y0, rows, outW, c) {
  const out = new Uint8Array(outW * rows * 3);
  const half = 1 << (PRECISION_BITS - 1);
  for (let yy = 0; yy < rows; yy++) {
    const rowIn = (yy + y0) * width * cin;
    const rowOut = yy * outW * 3;
    for (let xx = 0; xx < outW; xx++) {
      const xmin = c.bounds[2 * xx];
      const xmax = c.bounds[2 * xx + 1];
      const kb = xx * c.ksize;
      let s0 = half, s1 = half, s2 = half;
      let p = rowIn + xmin * cin;
      for (let x = 0; x < xmax; x++, p += cin) {
        const w = c.kk[kb + x];
        s0 += src[p] * w;
        s1 += src[p + 1] * w;
        s2 += src[p + 2] * w;
      }
      const o = rowOut + xx * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

// Vertical pass: src has `width` pixels per row and `cin` channels; out: RGB outH rows.
function resampleVertical(src, width, cin, outH, c) {
  const out = new Uint8Array(width * outH * 3);
  const half = 1 << (PRECISION_BITS - 1);
  const stride = width * cin;
  for (let yy = 0; yy < outH; yy++) {
    const ymin = c.bounds[2 * yy];
    const ymax = c.bounds[2 * yy + 1];
    const kb = yy * c.ksize;
    for (let xx = 0; xx < width; xx++) {
      let s0 = half, s1 = half, s2 = half;
      let p = ymin * stride + xx * cin;
      for (let y = 0; y < ymax; y++, p += stride) {
        const w = c.kk[kb + y];
        s0 += src[p] * w;
        s1 += src[p + 1] * w;
        s2 += src[p + 2] * w;
      }
      const o = (yy * width + xx) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

function toRGB(src, n, cin) {
  if (cin === 3) return src;
  const out = new Uint8Array(n * 3);
  for (let i = 0, p = 0; i < n; i++, p += cin) {
    out[3 * i] = src[p];
    out[3 * i + 1] = src[p + 1];
    out[3 * i + 2] = src[p + 2];
  }
  return out;
}

function resizeNearest(src, width, height, cin, outW, outH) {
  // ImagingScaleAffine: source position accumulated in double, truncated (COORD).
  const a0 = width / outW;
  const a4 = height / outH;
  const xin = new Int32Array(outW);
  let xo = a0 * 0.5;
  for (let x = 0; x < outW; x++) {
    xin[x] = Math.min(width - 1, xo < 0 ? 0 : Math.trunc(xo));
    xo += a0;
  }
  const out = new Uint8Array(outW * outH * 3);
  let yo = a4 * 0.5;
  for (let y = 0; y < outH; y++) {
    const yi = Math.min(height - 1, yo < 0 ? 0 : Math.trunc(yo));
    for (let x = 0; x < outW; x++) {
      const p = (yi * width + xin[x]) * cin;
      const o = (y * outW + x) * 3;
      out[o] = src[p];
      out[o + 1] = src[p + 1];
      out[o + 2] = src[p + 2];
    }
    yo += a4;
  }
  return out;
}

/**
 * Resize interleaved uint8 pixels (cin = 3 for RGB or 4 for RGBA, alpha ignored as PIL's
 * convert("RGB") does) to outW x outH with Pillow's algorithm; returns RGB uint8.
 */
export function resizePixels(src, width, height, cin, outW, outH, interpolation) {
  if (outW === width && outH === height) return toRGB(src, width * height, cin).slice();
  if (interpolation === "nearest") return resizeNearest(src, width, height, cin, outW, outH);
  const filter = FILTERS[interpolation];
  if (!filter) throw new Error(`unsupported interpolation '${interpolation}'`);
  const needH = outW !== width;
  const needV = outH !== height;
  const cv = precomputeCoeffs(height, outH, filter);
  let img = src, w = width, ch = cin;
  if (needH) {
    const first = cv.bounds[0];
    const last = cv.bounds[2 * outH - 2] + cv.bounds[2 * outH - 1];
    for (let i = 0; i < outH; i++) cv.bounds[2 * i] -= first;
    img = resampleHorizontal(src, width, cin, first, last - first, outW, precomputeCoeffs(width, outW, filter));
    w = outW;
    ch = 3;
  }
  if (needV) return resampleVertical(img, w, ch, outH, cv);
  return toRGB(img, w * outH, ch);
}

/** Crop an RGB image (width wide) to the box (left, top, tw, th). */
export function cropRGB(rgb, width, left, top, tw, th) {
  const out = new Uint8Array(tw * th * 3);
  for (let y = 0; y < th; y++) {
    const s = ((y + top) * width + left) * 3;
    out.set(rgb.subarray(s, s + tw * 3), y * tw * 3);
  }
  return out;
}

/** `normalize`: RGB uint8 HWC -> float32 in the spec's channel order and layout, with numpy's float32 rounding. */
export function normalizePixels(rgb, width, height, spec) {
  const f = Math.fround;
  const vr = f(spec.value_range);
  const mean = spec.mean.map(f);
  const std = spec.std.map(f);
  const n = width * height;
  const out = new Float32Array(n * 3);
  const bgr = spec.channel_order === "BGR";
  const nchw = spec.layout === "NCHW";
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < 3; c++) {
      const v = f(f(f(rgb[3 * i + c] / vr) - mean[c]) / std[c]);
      const oc = bgr ? 2 - c : c;
      out[nchw ? oc * n + i : 3 * i + oc] = v;
    }
  }
  return out;
}

/**
 * `preprocess_image` minus decoding: decoded pixels (RGBA from a canvas, or RGB) -> the model input.
 * Returns {input: Float32Array, dims, rgb: the uint8 crop the model sees, geometry}.
 */
export function preprocessPixels(pixels, width, height, channels, spec) {
  const g = geometry(width, height, spec);
  const resized = resizePixels(pixels, width, height, channels, g.nw, g.nh, spec.interpolation);
  const rgb = g.left || g.top || g.nw !== g.tw || g.nh !== g.th ? cropRGB(resized, g.nw, g.left, g.top, g.tw, g.th) : resized;
  const input = normalizePixels(rgb, g.tw, g.th, spec);
  const dims = spec.layout === "NCHW" ? [1, 3, g.th, g.tw] : [1, g.th, g.tw, 3];
  return { input, dims, rgb, geometry: g };
}
