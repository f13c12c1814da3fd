package org.minicpmvedge.core

/*
 * LLaVA-UHD slicing of MiniCPM-V 4.6 (a source view plus a grid of tiles), a port of
 * edge_runtime/processing/slicing.py. The geometry uses the same float64 operations in the same
 * order as the reference (Python's banker's rounding and a correctly rounded log included), so
 * every size matches exactly; [Slicing.preprocessImage] then resizes (Pillow-exact bicubic),
 * cuts the slices and, for a vision graph that takes patches, normalises and patchifies them.
 */

/** PIL's BICUBIC filter id, the only resample filter implemented. */
const val RESAMPLE_BICUBIC = 3

/** Preprocessing settings (edge_runtime SliceConfig) plus the model's position-table side. */
data class SliceConfig(
    val maxSliceNums: Int = 9,
    val scaleResolution: Int = 448,
    val patchSize: Int = 14,
    val sliceMode: Boolean = true,
    val downsampleMode: String = "16x",
    val imageMean: List<Double> = listOf(0.5, 0.5, 0.5),
    val imageStd: List<Double> = listOf(0.5, 0.5, 0.5),
    val rescaleFactor: Double = 1.0 / 255,
    val resample: Int = RESAMPLE_BICUBIC,
    val useImageId: Boolean = true,
    /** vision position table side (ModelInfo `num_patches_per_side`; 980 / 14 = 70 for MiniCPM-V 4.6). */
    val numPatchesPerSide: Int = 70,
) {
    init {
        Patches.mergeFactor(downsampleMode)
        require(maxSliceNums >= 1) { "max_slice_nums must be a positive integer, got $maxSliceNums" }
        require(scaleResolution >= 1) { "scale_resolution must be a positive integer, got $scaleResolution" }
        require(patchSize >= 1) { "patch_size must be a positive integer, got $patchSize" }
        require(numPatchesPerSide >= 1) { "num_patches_per_side must be a positive integer, got $numPatchesPerSide" }
        require(imageMean.size == 3 && imageStd.size == 3) { "image_mean and image_std must have 3 values (RGB)" }
        require(imageStd.none { it == 0.0 }) { "image_std must be non-zero" }
        require(resample == RESAMPLE_BICUBIC) { "resample $resample is not supported (only 3 = BICUBIC)" }
    }

    /** A copy with another downsample mode and slice limit (what a kit's image case overrides). */
    fun withOverrides(
        downsampleMode: String,
        maxSliceNums: Int,
    ): SliceConfig = copy(downsampleMode = downsampleMode, maxSliceNums = maxSliceNums)

    companion object {
        /**
         * From a `preprocessor_config.json` object (flat, or nested under "image_processor"), the
         * manifest's `preprocessing` section or the kit's `slice_config`, as the reference's
         * `SliceConfig.from_preprocessor_config` reads it: absent keys keep the defaults, the
         * legacy `norm_mean` / `norm_std` are accepted, a single number stands for all 3 channels.
         */
        fun fromJson(
            json: JsonValue,
            numPatchesPerSide: Int = 70,
        ): SliceConfig {
            val root = json.obj("preprocessor config")
            val cfg = (root.opt("image_processor") ?: root).obj("preprocessor config: 'image_processor'")

            fun intOr(
                key: String,
                default: Int,
            ): Int = cfg.opt(key)?.let { asInt(it, key) } ?: default

            fun boolOr(
                key: String,
                default: Boolean,
            ): Boolean = cfg.opt(key)?.bool(key) ?: default

            fun triple(
                key: String,
                legacy: String,
                default: List<Double>,
            ): List<Double> {
                val v = cfg.opt(key) ?: cfg.opt(legacy) ?: return default
                return if (v is JsonNumber) List(3) { v.toDouble() } else v.doubles(key).toList()
            }
            val d = SliceConfig()
            return SliceConfig(
                maxSliceNums = intOr("max_slice_nums", d.maxSliceNums),
                scaleResolution = intOr("scale_resolution", d.scaleResolution),
                patchSize = intOr("patch_size", d.patchSize),
                sliceMode = boolOr("slice_mode", d.sliceMode),
                downsampleMode = cfg.opt("downsample_mode")?.str("downsample_mode") ?: d.downsampleMode,
                imageMean = triple("image_mean", "norm_mean", d.imageMean),
                imageStd = triple("image_std", "norm_std", d.imageStd),
                rescaleFactor = cfg.opt("rescale_factor")?.double("rescale_factor") ?: d.rescaleFactor,
                resample = intOr("resample", d.resample),
                useImageId = boolOr("use_image_id", d.useImageId),
                numPatchesPerSide = numPatchesPerSide,
            )
        }

        /** Python's int(x) of a JSON number (an integer written as 4.0 is accepted; 4.5 is not). */
        private fun asInt(
            v: JsonValue,
            key: String,
        ): Int {
            val n = v.num(key)
            n.raw.toIntOrNull()?.let { return it }
            val d = n.toDouble()
            if (d != Math.floor(d) || Math.abs(d) > Int.MAX_VALUE) throw JsonException("$key must be an integer, got ${n.raw}")
            return d.toInt()
        }
    }
}

/** [height, width] pair. */
data class Size2(
    val h: Int,
    val w: Int,
) {
    fun toList(): List<Int> = listOf(h, w)
}

/** Geometry of one image's slices; sizes are (height, width) in pixels unless said otherwise. */
class SlicePlan(
    val imageSize: Size2,
    val sourceSize: Size2,
    /** (rows, cols) of tiles, or null when unsliced. */
    val grid: Size2?,
    val refineSize: Size2?,
    val patchSize: Int,
    val downsampleMode: String,
) {
    val tileSize: Size2? =
        if (grid != null && refineSize != null) Size2(refineSize.h / grid.h, refineSize.w / grid.w) else null

    /** Source first, then one per tile, row-major. */
    val sliceSizes: List<Size2> =
        listOf(sourceSize) + (if (tileSize != null && grid != null) List(grid.h * grid.w) { tileSize } else emptyList())
    val nSlices: Int get() = sliceSizes.size

    /** (h, w) in patches per slice. */
    val patchGrids: List<Size2> = sliceSizes.map { Size2(it.h / patchSize, it.w / patchSize) }
    val tokenCounts: List<Int> = patchGrids.map { it.h * it.w / Patches.tokenDivisor(downsampleMode) }
    val numTokens: Int get() = tokenCounts.sum()

    /** The token layout the prompt needs. */
    fun layout(): ImageLayout = ImageLayout(tokenCounts[0], grid, tokenCounts.drop(1))
}

/** One slice: its upright RGB pixels (what an image-taking vision method gets) and, if asked for, its patches. */
class PreparedSlice(
    /** 0 = the source view, then the tiles row-major. */
    val index: Int,
    val pixels: ImagePixels,
    val patchRows: Int,
    val patchCols: Int,
    val tokens: Int,
    /** Normalised window-major patches + position ids, or null when not requested. */
    val patches: SlicePatches?,
)

/** One image ready for the model: its plan, the resized views and the slices in order. */
class PreparedImage(
    val plan: SlicePlan,
    /** The source view (slice 0) after the resize, before normalisation. */
    val source: ImagePixels,
    /** The refined image before it is cut into tiles, or null when unsliced. */
    val refine: ImagePixels?,
    val slices: List<PreparedSlice>,
) {
    val numTokens: Int get() = plan.numTokens

    fun layout(): ImageLayout = plan.layout()
}

object Slicing {
    /** Python's round() of a float: nearest integer, ties to even (Math.rint). */
    private fun ensureDivide(
        length: Double,
        divisor: Int,
    ): Int = maxOf(Math.rint(length / divisor).toInt() * divisor, divisor)

    /** (rows, cols) of the tile grid, or null when the source view alone is enough. */
    fun slicedGrid(
        height: Int,
        width: Int,
        maxSliceNums: Int,
        scaleResolution: Int,
    ): Size2? {
        val logRatio = CorrectLog.log(width.toDouble() / height)
        val ratio = (width.toDouble() * height) / (scaleResolution.toDouble() * scaleResolution)
        val multiple = minOf(Math.ceil(ratio), maxSliceNums.toDouble()).toInt()
        if (multiple <= 1) return null
        var bestRows = 1
        var bestCols = 1
        var bestErr = Double.POSITIVE_INFINITY
        for (n in intArrayOf(multiple - 1, multiple, multiple + 1)) {
            if (n == 1 || n > maxSliceNums) continue
            for (rows in 1..n) {
                if (n % rows != 0) continue
                val cols = n / rows
                val err = Math.abs(logRatio - CorrectLog.log(cols.toDouble() / rows))
                if (err < bestErr || (err == bestErr && rows > bestRows)) {
                    bestRows = rows
                    bestCols = cols
                    bestErr = err
                }
            }
        }
        return Size2(bestRows, bestCols)
    }

    /** (h, w): scaled to about scaleResolution^2 if too big (or allowUpscale), snapped to the merge unit. */
    private fun findBestResize(
        height0: Double,
        width0: Double,
        scaleResolution: Int,
        patchSize: Int,
        mode: String,
        allowUpscale: Boolean,
    ): Size2 {
        var height = height0
        var width = width0
        if (height * width > scaleResolution.toDouble() * scaleResolution || allowUpscale) {
            val aspect = width / height
            height = Math.floor(scaleResolution / Math.sqrt(aspect)) // int() of a positive float
            width = Math.floor(height * aspect)
        }
        val unit = patchSize * Patches.mergeFactor(mode)
        return Size2(ensureDivide(height, unit), ensureDivide(width, unit))
    }

    private fun refineSizeOf(
        height: Int,
        width: Int,
        grid: Size2,
        cfg: SliceConfig,
    ): Size2 {
        val refineW = ensureDivide(width.toDouble(), grid.w)
        val refineH = ensureDivide(height.toDouble(), grid.h)
        val tile =
            findBestResize(
                refineH.toDouble() / grid.h,
                refineW.toDouble() / grid.w,
                cfg.scaleResolution,
                cfg.patchSize,
                cfg.downsampleMode,
                true,
            )
        return Size2(tile.h * grid.h, tile.w * grid.w)
    }

    /** Slice geometry of a height x width image (no pixels needed: the prompt counts tokens with it). */
    fun planSlices(
        height: Int,
        width: Int,
        cfg: SliceConfig,
    ): SlicePlan {
        require(height >= 1 && width >= 1) { "image has no pixels (${width}x$height)" }
        val grid = if (cfg.sliceMode) slicedGrid(height, width, cfg.maxSliceNums, cfg.scaleResolution) else null
        val source =
            findBestResize(height.toDouble(), width.toDouble(), cfg.scaleResolution, cfg.patchSize, cfg.downsampleMode, grid == null)
        val refine = if (grid == null) null else refineSizeOf(height, width, grid, cfg)
        return SlicePlan(Size2(height, width), source, grid, refine, cfg.patchSize, cfg.downsampleMode)
    }

    /**
     * Resize and cut an upright RGB image (edge_runtime slice_image); with [withPatches] also
     * normalise and patchify each slice (slice_to_patches) for a vision method that takes patches.
     */
    fun preprocessImage(
        img: ImagePixels,
        cfg: SliceConfig,
        withPatches: Boolean = true,
    ): PreparedImage {
        val plan = planSlices(img.height, img.width, cfg)
        val table =
            if (withPatches) {
                Patches.normalizationTable(
                    cfg.imageMean.toDoubleArray(),
                    cfg.imageStd.toDoubleArray(),
                    cfg.rescaleFactor,
                )
            } else {
                null
            }

        fun slice(
            index: Int,
            from: ImagePixels,
            x0: Int,
            y0: Int,
            w: Int,
            h: Int,
        ): PreparedSlice {
            val pixels = if (x0 == 0 && y0 == 0 && w == from.width && h == from.height) from else from.crop(x0, y0, w, h)
            val patches =
                table?.let {
                    Patches.sliceToPatches(from, x0, y0, w, h, it, cfg.patchSize, cfg.downsampleMode, cfg.numPatchesPerSide)
                }
            return PreparedSlice(index, pixels, h / cfg.patchSize, w / cfg.patchSize, plan.tokenCounts[index], patches)
        }
        val source = img.resized(plan.sourceSize.w, plan.sourceSize.h)
        val slices = mutableListOf(slice(0, source, 0, 0, source.width, source.height))
        var refine: ImagePixels? = null
        val grid = plan.grid
        val refineSize = plan.refineSize
        val tile = plan.tileSize
        if (grid != null && refineSize != null && tile != null) {
            val refined = img.resized(refineSize.w, refineSize.h)
            refine = refined
            for (r in 0 until grid.h) {
                for (c in 0 until grid.w) slices.add(slice(slices.size, refined, c * tile.w, r * tile.h, tile.w, tile.h))
            }
        }
        return PreparedImage(plan, source, refine, slices)
    }
}

/**
 * Natural log rounded correctly to float64. The grid choice compares |log(w/h) - log(cols/rows)|
 * between candidates, and exact mathematical ties (a 3:1 image between 1x6 and 2x3, say) are
 * decided by the last bit of each log. The reference's libm (glibc) is correctly rounded on every
 * argument that can take part in such a tie; Java's Math.log (an intrinsic, 1 ulp) need not be.
 * So the log is computed in double-double arithmetic (about 100 bits) and rounded once.
 */
object CorrectLog {
    private const val SPLITTER = 134217729.0 // 2^27 + 1
    private const val LN2_HI = 0.6931471805599453 // float64 nearest ln 2
    private const val LN2_LO = 2.3190468138462996e-17 // ln 2 - LN2_HI

    private class DD(
        val hi: Double,
        val lo: Double,
    )

    private fun quickTwoSum(
        a: Double,
        b: Double,
    ): DD {
        val s = a + b
        return DD(s, b - (s - a))
    }

    private fun twoSum(
        a: Double,
        b: Double,
    ): DD {
        val s = a + b
        val bb = s - a
        return DD(s, (a - (s - bb)) + (b - bb))
    }

    private fun twoProd(
        a: Double,
        b: Double,
    ): DD {
        val p = a * b
        val ca = SPLITTER * a
        val ah = ca - (ca - a)
        val al = a - ah
        val cb = SPLITTER * b
        val bh = cb - (cb - b)
        val bl = b - bh
        return DD(p, ((ah * bh - p) + ah * bl + al * bh) + al * bl)
    }

    private fun add(
        x: DD,
        y: DD,
    ): DD {
        val s = twoSum(x.hi, y.hi)
        val t = twoSum(x.lo, y.lo)
        val u = quickTwoSum(s.hi, s.lo + t.hi)
        return quickTwoSum(u.hi, u.lo + t.lo)
    }

    private fun mul(
        x: DD,
        y: DD,
    ): DD {
        val p = twoProd(x.hi, y.hi)
        return quickTwoSum(p.hi, p.lo + (x.hi * y.lo + x.lo * y.hi))
    }

    private fun mulD(
        x: DD,
        b: Double,
    ): DD {
        val p = twoProd(x.hi, b)
        return quickTwoSum(p.hi, p.lo + x.lo * b)
    }

    private fun div(
        x: DD,
        y: DD,
    ): DD {
        val q1 = x.hi / y.hi
        val r1 = add(x, mulD(y, -q1))
        val q2 = r1.hi / y.hi
        val r2 = add(r1, mulD(y, -q2))
        val q3 = r2.hi / y.hi
        return add(quickTwoSum(q1, q2), DD(q3, 0.0))
    }

    /** log(x) for finite x > 0, correctly rounded except within ~2^-100 of a rounding midpoint. */
    fun log(x: Double): Double {
        if (!(x > 0) || !x.isFinite()) return Math.log(x)
        // x = 2^k * m, m in [1, 2) (a subnormal x is scaled up by 2^54 first, exactly)
        val scaled = if (Math.getExponent(x) < java.lang.Double.MIN_EXPONENT) 54 else 0
        val y = Math.scalb(x, scaled)
        var k = Math.getExponent(y)
        var m = Math.scalb(y, -k)
        k -= scaled
        if (m > Math.sqrt(2.0)) {
            m /= 2
            k += 1
        }
        // log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172: sum s^(2i+1) / (2i+1)
        val s = div(DD(m - 1, 0.0), twoSum(m, 1.0))
        val s2 = mul(s, s)
        var term = s
        var sum = s
        for (i in 1 until 40) {
            if (term.hi == 0.0) break
            term = mul(term, s2)
            val t = div(term, DD((2 * i + 1).toDouble(), 0.0))
            if (Math.abs(t.hi) < Math.abs(sum.hi) * 1e-36) break
            sum = add(sum, t)
        }
        val logM = DD(2 * sum.hi, 2 * sum.lo)
        val kLn2 = add(twoProd(k.toDouble(), LN2_HI), DD(k * LN2_LO, 0.0))
        val r = add(kLn2, logM)
        return r.hi + r.lo
    }
}
