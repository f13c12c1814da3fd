package org.minicpmvedge.core

/**
 * The vision graph's input for one slice, as edge_runtime/processing/patches.py and image.py
 * `normalize`: PxP patches of the normalised slice in window-major order, and their position ids.
 */
object Patches {
    /** Patches per side merged into one LLM token: 4 in "16x" mode, 2 in "4x". */
    fun mergeFactor(mode: String): Int =
        when (mode) {
            "16x" -> 4
            "4x" -> 2
            else -> throw IllegalArgumentException("downsample_mode must be \"16x\" or \"4x\", got \"$mode\"")
        }

    /** Patches per LLM token: 16 in "16x" mode, 4 in "4x". */
    fun tokenDivisor(mode: String): Int = mergeFactor(mode).let { it * it }

    /**
     * float32 [3 * 256]: `((level * rescale) - mean[c]) / std[c]` for every uint8 level with the
     * reference's precisions: level * rescale in float64 rounded to float32, then subtract and
     * divide in float32.
     */
    fun normalizationTable(
        mean: DoubleArray,
        std: DoubleArray,
        rescale: Double,
    ): FloatArray {
        require(mean.size == 3 && std.size == 3) { "image_mean and image_std need 3 values (RGB)" }
        val table = FloatArray(3 * 256)
        for (c in 0 until 3) {
            val m = mean[c].toFloat()
            val s = std[c].toFloat()
            require(s != 0f) { "image_std must be non-zero" }
            for (v in 0 until 256) {
                val level = (v * rescale).toFloat()
                table[c * 256 + v] = (level - m) / s
            }
        }
        return table
    }

    /** Both patch-grid sides must be positive multiples of the merge factor. */
    fun checkPatchGrid(
        h: Int,
        w: Int,
        mode: String,
    ) {
        val m = mergeFactor(mode)
        require(h >= 1 && w >= 1 && h % m == 0 && w % m == 0) {
            "slice patch grid ${h}x$w is not a positive multiple of $m per side, as \"$mode\" mode needs"
        }
    }

    /**
     * [h*w]: the row-major patch index at each window-major position. "16x": each 4x4 block of
     * patches is four 2x2 windows, blocks then windows then patches row-major; "4x": 2x2 windows.
     */
    fun windowOrder(
        h: Int,
        w: Int,
        mode: String,
    ): IntArray {
        checkPatchGrid(h, w, mode)
        val order = IntArray(h * w)
        var k = 0
        if (mode == "16x") {
            for (br in 0 until h / 4) {
                for (bc in 0 until w / 4) {
                    for (sr in 0 until 2) {
                        for (sc in 0 until 2) {
                            for (r in 0 until 2) {
                                for (c in 0 until 2) order[k++] = (br * 4 + sr * 2 + r) * w + (bc * 4 + sc * 2 + c)
                            }
                        }
                    }
                }
            }
            return order
        }
        for (wr in 0 until h / 2) {
            for (wc in 0 until w / 2) {
                for (r in 0 until 2) {
                    for (c in 0 until 2) order[k++] = (wr * 2 + r) * w + (wc * 2 + c)
                }
            }
        }
        return order
    }

    /**
     * float32 boundaries of `torch.arange(1/n, 1.0, 1/n, dtype=float32)` on CPU, element for
     * element: count = ceil((1 - 1/n) / (1/n)) in float64; torch fills 16 elements at a time with
     * two 8-wide vectors (`base = f32(start + step * i0)`, element j = `f32(base + j * step)` in
     * float64) and the tail one by one (`f32(start + step * i)`).
     */
    fun positionBoundaries(n: Int): FloatArray {
        val start = 1.0 / n
        val step = 1.0 / n
        val count = Math.ceil((1.0 - start) / step).toInt()
        val out = FloatArray(count)
        val vec = 8
        val bulk = (count / (2 * vec)) * (2 * vec)
        var i0 = 0
        while (i0 < bulk) {
            val base = (start + step * i0).toFloat().toDouble()
            for (j in 0 until vec) out[i0 + j] = (base + j * step).toFloat()
            i0 += vec
        }
        for (i in bulk until count) out[i] = (start + step * i).toFloat()
        return out
    }

    /** `bucketize(arange(size) / size, boundaries, right=True)` per coordinate. */
    private fun buckets(
        size: Int,
        boundaries: FloatArray,
    ): IntArray {
        val out = IntArray(size)
        var b = 0
        for (i in 0 until size) {
            val v = (i.toDouble() / size).toFloat()
            while (b < boundaries.size && boundaries[b] <= v) b++
            out[i] = b
        }
        return out
    }

    /** [h*w] row-major ids into the n*n position table (transformers' nearest-position ids). */
    fun rowMajorPositionIds(
        h: Int,
        w: Int,
        n: Int,
    ): IntArray {
        val boundaries = positionBoundaries(n)
        val rows = buckets(h, boundaries)
        val cols = buckets(w, boundaries)
        val ids = IntArray(h * w)
        for (r in 0 until h) for (c in 0 until w) ids[r * w + c] = rows[r] * n + cols[c]
        return ids
    }

    /**
     * Cut the [regionW] x [regionH] rectangle at ([x0], [y0]) of [img] into normalised patches in
     * window-major order, with their position ids.
     */
    fun sliceToPatches(
        img: ImagePixels,
        x0: Int,
        y0: Int,
        regionW: Int,
        regionH: Int,
        table: FloatArray,
        patchSize: Int,
        mode: String,
        numPatchesPerSide: Int,
    ): SlicePatches {
        val p = patchSize
        require(regionW % p == 0 && regionH % p == 0) { "slice ${regionH}x$regionW px is not a multiple of the $p-px patch" }
        require(x0 >= 0 && y0 >= 0 && x0 + regionW <= img.width && y0 + regionH <= img.height) { "slice region outside the image" }
        val h = regionH / p
        val w = regionW / p
        val order = windowOrder(h, w, mode)
        val rowIds = rowMajorPositionIds(h, w, numPatchesPerSide)
        val count = h * w
        val pp = p * p
        val dim = 3 * pp
        val patches = FloatArray(count * dim)
        val ids = LongArray(count)
        val stride = img.width * 3
        val rgb = img.rgb
        for (k in 0 until count) {
            val idx = order[k]
            ids[k] = rowIds[idx].toLong()
            val pr = idx / w
            val pc = idx - pr * w
            val px0 = x0 + pc * p
            val py0 = y0 + pr * p
            val rowBase = k * dim
            for (y in 0 until p) {
                var src = (py0 + y) * stride + px0 * 3
                var dst = rowBase + y * p
                for (x in 0 until p) {
                    patches[dst] = table[rgb[src].toInt() and 0xff]
                    patches[dst + pp] = table[256 + (rgb[src + 1].toInt() and 0xff)]
                    patches[dst + 2 * pp] = table[512 + (rgb[src + 2].toInt() and 0xff)]
                    src += 3
                    dst += 1
                }
            }
        }
        return SlicePatches(patches, ids, h, w, count / tokenDivisor(mode))
    }
}

/** One slice ready for a vision graph that takes patches (float32 [L, 3*P*P] window-major, int64 [L] ids). */
class SlicePatches(
    val patches: FloatArray,
    val positionIds: LongArray,
    val patchRows: Int,
    val patchCols: Int,
    /** LLM tokens: h*w / 16 ("16x") or / 4 ("4x"). */
    val tokens: Int,
)
