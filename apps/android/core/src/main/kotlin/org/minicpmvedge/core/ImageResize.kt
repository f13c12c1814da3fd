package org.minicpmvedge.core

/**
 * Bicubic resize of interleaved uint8 RGB, bit-exact with Pillow 13.0's `Image.resize(size, BICUBIC)`
 * (edge_runtime/processing/image.py `resize`), after Pillow's libImaging/Resample.c:
 * - per output coordinate, a window of input samples centred on `(i + 0.5) * scale`, the cubic
 *   kernel (a = -0.5, support 2) stretched by `max(scale, 1)` when downscaling, clipped at the
 *   edges and normalised to sum 1 in float64;
 * - weights turned into 22-bit fixed point (round half away from zero); each output sample is
 *   `(2^21 + sum(v * w)) >> 22` clamped to [0, 255], in int32;
 * - two passes with a uint8 intermediate, a pass whose size does not change skipped. The order is
 *   Pillow 13.0's: vertical first when the height shrinks by more than twice as many pixels as the
 *   width (`dH > 0 && dH > 2 * dW`), else horizontal first, over only the input rows the vertical
 *   pass reads. (Pillow 11/12 always ran horizontal first; the order changes results by a level.)
 */
object ImageResize {
    private const val PRECISION_BITS = 22
    private const val FIXED_ONE = 1 shl PRECISION_BITS
    private const val FIXED_HALF = 1 shl (PRECISION_BITS - 1)
    private const val SUPPORT = 2.0

    /** Fixed-point weights of one pass: output i reads inputs [bounds[2i], bounds[2i] + bounds[2i+1]). */
    private class Coefficients(
        val ksize: Int,
        val bounds: IntArray,
        val weights: IntArray,
    )

    /** Keys' cubic kernel with a = -0.5, the same float64 operations as Pillow's `bicubic_filter`. */
    private fun bicubic(x0: Double): Double {
        val a = -0.5
        val x = if (x0 < 0.0) -x0 else x0
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a
        return 0.0
    }

    private fun coefficients(
        inSize: Int,
        outSize: Int,
    ): Coefficients {
        val scale = inSize.toDouble() / outSize
        val filterScale = if (scale < 1.0) 1.0 else scale
        val support = SUPPORT * filterScale
        val ksize = Math.ceil(support).toInt() * 2 + 1
        val bounds = IntArray(outSize * 2)
        val weights = IntArray(outSize * ksize)
        val window = DoubleArray(ksize)
        val invFilterScale = 1.0 / filterScale
        for (xx in 0 until outSize) {
            val center = (xx + 0.5) * scale
            var xmin = (center - support + 0.5).toInt() // C (int): truncation toward zero
            if (xmin < 0) xmin = 0
            var xmax = (center + support + 0.5).toInt()
            if (xmax > inSize) xmax = inSize
            xmax -= xmin
            var total = 0.0
            for (x in 0 until xmax) {
                val w = bicubic(((x + xmin) - center + 0.5) * invFilterScale)
                window[x] = w
                total += w
            }
            val base = xx * ksize
            for (x in 0 until xmax) {
                val w = if (total != 0.0) window[x] / total else window[x]
                weights[base + x] = if (w < 0) (-0.5 + w * FIXED_ONE).toInt() else (0.5 + w * FIXED_ONE).toInt()
            }
            bounds[xx * 2] = xmin
            bounds[xx * 2 + 1] = xmax
        }
        return Coefficients(ksize, bounds, weights)
    }

    private fun clip8(acc: Int): Byte {
        val v = acc shr PRECISION_BITS
        return (
            if (v < 0) {
                0
            } else if (v > 255) {
                255
            } else {
                v
            }
        ).toByte()
    }

    /** Rows [rowStart, rowStart + rows) of src (width srcW) to width dstW: [rows, dstW, 3]. */
    private fun horizontal(
        src: ByteArray,
        srcW: Int,
        rowStart: Int,
        rows: Int,
        dstW: Int,
        c: Coefficients,
    ): ByteArray {
        val out = ByteArray(rows * dstW * 3)
        for (y in 0 until rows) {
            val inRow = (y + rowStart) * srcW * 3
            val outRow = y * dstW * 3
            for (xx in 0 until dstW) {
                val xmin = c.bounds[xx * 2]
                val count = c.bounds[xx * 2 + 1]
                val kb = xx * c.ksize
                var s0 = FIXED_HALF
                var s1 = FIXED_HALF
                var s2 = FIXED_HALF
                var p = inRow + xmin * 3
                for (x in 0 until count) {
                    val w = c.weights[kb + x]
                    s0 += (src[p].toInt() and 0xff) * w
                    s1 += (src[p + 1].toInt() and 0xff) * w
                    s2 += (src[p + 2].toInt() and 0xff) * w
                    p += 3
                }
                val o = outRow + xx * 3
                out[o] = clip8(s0)
                out[o + 1] = clip8(s1)
                out[o + 2] = clip8(s2)
            }
        }
        return out
    }

    /** src is [.., width, 3] whose row 0 is input row rowOffset; output [dstH, width, 3]. */
    private fun vertical(
        src: ByteArray,
        width: Int,
        rowOffset: Int,
        dstH: Int,
        c: Coefficients,
    ): ByteArray {
        val stride = width * 3
        val out = ByteArray(dstH * stride)
        val acc = IntArray(stride)
        for (yy in 0 until dstH) {
            val ymin = c.bounds[yy * 2] - rowOffset
            val count = c.bounds[yy * 2 + 1]
            val kb = yy * c.ksize
            acc.fill(FIXED_HALF)
            for (y in 0 until count) {
                val w = c.weights[kb + y]
                val row = (ymin + y) * stride
                for (i in 0 until stride) acc[i] += (src[row + i].toInt() and 0xff) * w
            }
            val outRow = yy * stride
            for (i in 0 until stride) out[outRow + i] = clip8(acc[i])
        }
        return out
    }

    /** Resize interleaved RGB [srcH, srcW, 3] to [dstH, dstW, 3] like Pillow's BICUBIC (always a new array). */
    fun resizeBicubicRgb(
        src: ByteArray,
        srcW: Int,
        srcH: Int,
        dstW: Int,
        dstH: Int,
    ): ByteArray {
        require(srcW >= 1 && srcH >= 1 && dstW >= 1 && dstH >= 1) { "resize: bad sizes ${srcW}x$srcH -> ${dstW}x$dstH" }
        require(src.size.toLong() == srcW.toLong() * srcH * 3) { "resize: ${src.size} bytes for a ${srcW}x$srcH RGB image" }
        val needH = dstW != srcW
        val needV = dstH != srcH
        if (!needH && !needV) return src.copyOf()
        val vert = coefficients(srcH, dstH)
        val shrinkH = srcH - dstH
        val horizontalFirst = !(shrinkH > 0 && shrinkH > (srcW - dstW) * 2)
        if (!horizontalFirst) {
            val stage = vertical(src, srcW, 0, dstH, vert)
            return if (!needH) stage else horizontal(stage, srcW, 0, dstH, dstW, coefficients(srcW, dstW))
        }
        val firstRow = vert.bounds[0]
        val lastRow = vert.bounds[dstH * 2 - 2] + vert.bounds[dstH * 2 - 1]
        var stage = src
        var rowOffset = 0
        if (needH) {
            stage = horizontal(src, srcW, firstRow, lastRow - firstRow, dstW, coefficients(srcW, dstW))
            rowOffset = firstRow
        }
        return if (!needV) stage else vertical(stage, dstW, rowOffset, dstH, vert)
    }
}
