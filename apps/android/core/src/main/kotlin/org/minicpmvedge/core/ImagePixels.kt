package org.minicpmvedge.core

/** Decoded, upright RGB pixels: [rgb] is uint8 [height, width, 3], row-major (HWC). */
class ImagePixels(
    val width: Int,
    val height: Int,
    val rgb: ByteArray,
) {
    init {
        require(width >= 1 && height >= 1) { "image has no pixels (${width}x$height)" }
        require(rgb.size.toLong() == width.toLong() * height * 3) {
            "${rgb.size} bytes for a ${width}x$height RGB image (need ${width.toLong() * height * 3})"
        }
    }

    /** This image resized to [newWidth] x [newHeight] like Pillow's BICUBIC. */
    fun resized(
        newWidth: Int,
        newHeight: Int,
    ): ImagePixels = ImagePixels(newWidth, newHeight, ImageResize.resizeBicubicRgb(rgb, width, height, newWidth, newHeight))

    /** The rectangle [x0, x0 + w) x [y0, y0 + h) as its own image (a copy). */
    fun crop(
        x0: Int,
        y0: Int,
        w: Int,
        h: Int,
    ): ImagePixels {
        require(x0 >= 0 && y0 >= 0 && w >= 1 && h >= 1 && x0 + w <= width && y0 + h <= height) {
            "crop ${w}x$h at ($x0, $y0) is outside the ${width}x$height image"
        }
        val out = ByteArray(w * h * 3)
        for (y in 0 until h) System.arraycopy(rgb, ((y0 + y) * width + x0) * 3, out, y * w * 3, w * 3)
        return ImagePixels(w, h, out)
    }

    /** Planar uint8 [3, height, width] (CHW): the layout of ExecuTorch's runner `Image` (edge_runtime PreparedImage.pixels). */
    fun toChw(): ByteArray {
        val plane = width * height
        val out = ByteArray(plane * 3)
        for (i in 0 until plane) {
            out[i] = rgb[i * 3]
            out[plane + i] = rgb[i * 3 + 1]
            out[2 * plane + i] = rgb[i * 3 + 2]
        }
        return out
    }

    /** [toChw] as ints 0..255 (LlmModule.prefillImages takes an int[] image). */
    fun toChwInts(): IntArray = toChw().let { b -> IntArray(b.size) { b[it].toInt() and 0xff } }

    companion object {
        /**
         * From packed ARGB ints (android.graphics.Bitmap.getPixels order, alpha ignored: a decoded
         * photo is opaque; transparent images should be composited onto white first, as the reference does).
         */
        fun fromArgb(
            width: Int,
            height: Int,
            argb: IntArray,
        ): ImagePixels {
            require(argb.size.toLong() == width.toLong() * height) { "${argb.size} pixels for a ${width}x$height image" }
            val rgb = ByteArray(argb.size * 3)
            for (i in argb.indices) {
                val p = argb[i]
                rgb[i * 3] = (p shr 16).toByte()
                rgb[i * 3 + 1] = (p shr 8).toByte()
                rgb[i * 3 + 2] = p.toByte()
            }
            return ImagePixels(width, height, rgb)
        }
    }
}
