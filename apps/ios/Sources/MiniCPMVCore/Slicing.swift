import Foundation

/// LLaVA-UHD slicing of MiniCPM-V 4.6 (a source view plus a grid of tiles), a port of
/// edge_runtime/processing/slicing.py (by way of the HarmonyOS app's Slicing.ets). The geometry
/// uses the same float64 operations in the same order as the reference (Python's banker's rounding
/// included), so every size matches exactly; `preprocessImage` then resizes (Pillow-exact bicubic),
/// normalises and cuts the patches. Works on plain pixel buffers: the app decodes (CGImage) at the edge.

/// Decoded, upright RGB pixels: `rgb` is uint8 [height, width, 3], row-major.
public struct ImagePixels: Sendable, Equatable {
    public let width: Int
    public let height: Int
    public let rgb: [UInt8]

    public init(width: Int, height: Int, rgb: [UInt8]) throws {
        guard width >= 1, height >= 1 else {
            throw CoreError.invalid("image has no pixels (\(width)x\(height))")
        }
        guard rgb.count == width * height * 3 else {
            throw CoreError.invalid(
                "\(rgb.count) bytes for a \(width)x\(height) RGB image (need \(width * height * 3))")
        }
        self.width = width
        self.height = height
        self.rgb = rgb
    }

    /// From RGBA bytes (what a CGContext draws into), dropping alpha.
    public init(width: Int, height: Int, rgba: [UInt8]) throws {
        guard rgba.count == width * height * 4 else {
            throw CoreError.invalid("\(rgba.count) bytes for a \(width)x\(height) RGBA image")
        }
        var rgb = [UInt8](repeating: 0, count: width * height * 3)
        for i in 0..<(width * height) {
            rgb[i * 3] = rgba[i * 4]
            rgb[i * 3 + 1] = rgba[i * 4 + 1]
            rgb[i * 3 + 2] = rgba[i * 4 + 2]
        }
        try self.init(width: width, height: height, rgb: rgb)
    }
}

/// Preprocessing settings (edge_runtime SliceConfig) plus the model's position-table side.
public struct SliceConfig: Sendable, Equatable {
    public var maxSliceNums: Int = 9
    public var scaleResolution: Int = 448
    public var patchSize: Int = 14
    public var sliceMode: Bool = true
    public var downsampleMode: DownsampleMode = .x16
    public var imageMean: [Double] = [0.5, 0.5, 0.5]
    public var imageStd: [Double] = [0.5, 0.5, 0.5]
    public var rescaleFactor: Double = 1.0 / 255.0
    /// PIL filter id; only 3 (BICUBIC) is implemented.
    public var resample: Int = 3
    public var useImageId: Bool = true
    /// Vision position table side (ModelInfo `num_patches_per_side`).
    public var numPatchesPerSide: Int = 70

    public init() {}

    /// From a `slice_config` / manifest `preprocessing` / preprocessor_config.json object.
    public init(json: [String: Any], numPatchesPerSide: Int) throws {
        let j = JSONObject(json, "slice_config")
        maxSliceNums = try j.int("max_slice_nums")
        scaleResolution = try j.int("scale_resolution")
        patchSize = try j.int("patch_size")
        sliceMode = try j.bool("slice_mode")
        downsampleMode = try DownsampleMode(parsing: j.string("downsample_mode"))
        imageMean = try j.doubles("image_mean")
        imageStd = try j.doubles("image_std")
        rescaleFactor = try j.double("rescale_factor")
        resample = try j.int("resample")
        useImageId = try j.bool("use_image_id")
        self.numPatchesPerSide = numPatchesPerSide
        try validate()
    }

    /// A copy with another downsample mode and slice limit (what an image case overrides).
    public func with(downsampleMode: DownsampleMode, maxSliceNums: Int) throws -> SliceConfig {
        var cfg = self
        cfg.downsampleMode = downsampleMode
        cfg.maxSliceNums = maxSliceNums
        try cfg.validate()
        return cfg
    }

    /// Throws on settings the reference refuses (or that this port does not implement).
    public func validate() throws {
        for (value, name) in [
            (maxSliceNums, "max_slice_nums"), (scaleResolution, "scale_resolution"), (patchSize, "patch_size"),
            (numPatchesPerSide, "num_patches_per_side"),
        ] where value < 1 {
            throw CoreError.invalid("\(name) must be a positive integer, got \(value)")
        }
        guard imageMean.count == 3, imageStd.count == 3 else {
            throw CoreError.invalid("image_mean and image_std must have 3 values (RGB)")
        }
        guard !imageStd.contains(0) else {
            throw CoreError.invalid("image_std must be non-zero")
        }
        guard resample == 3 else {
            throw CoreError.invalid("resample \(resample) is not supported (only 3 = BICUBIC)")
        }
    }
}

/// Geometry of one image's slices; sizes are [height, width] in pixels unless said otherwise.
public struct SlicePlan: Sendable, Equatable {
    public let imageSize: [Int]
    public let sourceSize: [Int]
    /// [rows, cols], or nil when unsliced.
    public let grid: [Int]?
    public let refineSize: [Int]?
    public let tileSize: [Int]?
    /// Source first, then one per tile row-major.
    public let sliceSizes: [[Int]]
    /// [h, w] in patches per slice.
    public let patchGrids: [[Int]]
    public let tokenCounts: [Int]
    public let downsampleMode: DownsampleMode

    public var nSlices: Int { sliceSizes.count }
    public var numTokens: Int { tokenCounts.reduce(0, +) }

    init(
        imageSize: [Int], sourceSize: [Int], grid: [Int]?, refineSize: [Int]?, patchSize: Int,
        mode: DownsampleMode
    ) {
        self.imageSize = imageSize
        self.sourceSize = sourceSize
        self.grid = grid
        self.refineSize = refineSize
        self.downsampleMode = mode
        var sizes = [sourceSize]
        if let grid, let refineSize {
            let tile = [refineSize[0] / grid[0], refineSize[1] / grid[1]]
            tileSize = tile
            sizes += [[Int]](repeating: tile, count: grid[0] * grid[1])
        } else {
            tileSize = nil
        }
        sliceSizes = sizes
        patchGrids = sizes.map { [$0[0] / patchSize, $0[1] / patchSize] }
        tokenCounts = patchGrids.map { $0[0] * $0[1] / mode.tokenDivisor }
    }
}

/// One image ready for the vision graph: its plan, the resized views and the slices in order.
public struct PreparedImage: Sendable {
    public let plan: SlicePlan
    /// The source view (slice 0) before normalisation.
    public let source: ImagePixels
    /// The refined image before it is cut into tiles, or nil when unsliced.
    public let refine: ImagePixels?
    /// Source first, then tiles row-major.
    public let slices: [SlicePatches]

    public var downsampleMode: DownsampleMode { plan.downsampleMode }
    public var numTokens: Int { plan.numTokens }
}

public enum Slicing {
    /// Python's round() of a float: nearest integer, ties to even.
    static func roundHalfEven(_ x: Double) -> Double {
        x.rounded(.toNearestOrEven)
    }

    /// Nearest multiple of `divisor` (ties to even), at least `divisor`.
    static func ensureDivide(_ length: Double, _ divisor: Int) -> Int {
        max(Int(roundHalfEven(length / Double(divisor))) * divisor, divisor)
    }

    /// [rows, cols] of the tile grid, or nil when the source view alone is enough.
    public static func slicedGrid(height: Int, width: Int, maxSliceNums: Int, scaleResolution: Int) -> [Int]? {
        let logRatio = CorrectlyRoundedLog.log(Double(width) / Double(height))
        let ratio = Double(width * height) / Double(scaleResolution * scaleResolution)
        let multiple = min(Int(ratio.rounded(.up)), maxSliceNums)
        if multiple <= 1 {
            return nil
        }
        var best = [1, 1]
        var bestErr = Double.infinity
        for n in [multiple - 1, multiple, multiple + 1] where n != 1 && n <= maxSliceNums {
            for rows in 1...n where n % rows == 0 {
                let cols = n / rows
                let err = abs(logRatio - CorrectlyRoundedLog.log(Double(cols) / Double(rows)))
                if err < bestErr || (err == bestErr && rows > best[0]) {
                    best = [rows, cols]
                    bestErr = err
                }
            }
        }
        return best
    }

    /// [h, w]: scaled to about scaleResolution^2 if too big (or allowUpscale), snapped to the merge unit.
    static func findBestResize(
        height h0: Double, width w0: Double, scaleResolution: Int, patchSize: Int, mode: DownsampleMode,
        allowUpscale: Bool
    ) -> [Int] {
        var height = h0
        var width = w0
        let s = Double(scaleResolution)
        if height * width > s * s || allowUpscale {
            let aspect = width / height
            height = (s / aspect.squareRoot()).rounded(.towardZero)
            width = (height * aspect).rounded(.towardZero)
        }
        let unit = patchSize * mode.mergeFactor
        return [ensureDivide(height, unit), ensureDivide(width, unit)]
    }

    static func refineSize(
        height: Int, width: Int, grid: [Int], scaleResolution: Int, patchSize: Int, mode: DownsampleMode
    ) -> [Int] {
        let refineW = ensureDivide(Double(width), grid[1])
        let refineH = ensureDivide(Double(height), grid[0])
        let tile = findBestResize(
            height: Double(refineH) / Double(grid[0]), width: Double(refineW) / Double(grid[1]),
            scaleResolution: scaleResolution, patchSize: patchSize, mode: mode, allowUpscale: true)
        return [tile[0] * grid[0], tile[1] * grid[1]]
    }

    /// Slice geometry of a height x width image (no pixels needed).
    public static func plan(height: Int, width: Int, config cfg: SliceConfig) throws -> SlicePlan {
        guard height >= 1, width >= 1 else {
            throw CoreError.invalid("image has no pixels (\(width)x\(height))")
        }
        let grid =
            cfg.sliceMode
            ? slicedGrid(
                height: height, width: width, maxSliceNums: cfg.maxSliceNums, scaleResolution: cfg.scaleResolution)
            : nil
        let source = findBestResize(
            height: Double(height), width: Double(width), scaleResolution: cfg.scaleResolution,
            patchSize: cfg.patchSize, mode: cfg.downsampleMode, allowUpscale: grid == nil)
        let refine = grid.map {
            refineSize(
                height: height, width: width, grid: $0, scaleResolution: cfg.scaleResolution,
                patchSize: cfg.patchSize, mode: cfg.downsampleMode)
        }
        return SlicePlan(
            imageSize: [height, width], sourceSize: source, grid: grid, refineSize: refine,
            patchSize: cfg.patchSize, mode: cfg.downsampleMode)
    }

    /// Resize an image like Pillow's BICUBIC.
    public static func resize(_ img: ImagePixels, height: Int, width: Int) -> ImagePixels {
        let rgb = BicubicResize.resize(img.rgb, srcW: img.width, srcH: img.height, dstW: width, dstH: height)
        // sizes are positive and the buffer is exactly [height, width, 3]
        return try! ImagePixels(width: width, height: height, rgb: rgb)  // swiftlint:disable:this force_try
    }

    /// Resize, cut, normalise and patchify an upright RGB image (slice_image + slice_to_patches).
    public static func preprocess(_ img: ImagePixels, config cfg: SliceConfig) throws -> PreparedImage {
        try cfg.validate()
        let plan = try plan(height: img.height, width: img.width, config: cfg)
        let table = Patches.normalizationTable(mean: cfg.imageMean, std: cfg.imageStd, rescale: cfg.rescaleFactor)
        let p = cfg.patchSize
        let source = resize(img, height: plan.sourceSize[0], width: plan.sourceSize[1])
        var slices = [
            try Patches.slice(
                source.rgb, imageWidth: source.width, x0: 0, y0: 0, width: source.width, height: source.height,
                table: table, patchSize: p, mode: cfg.downsampleMode, numPatchesPerSide: cfg.numPatchesPerSide)
        ]
        var refine: ImagePixels?
        if let grid = plan.grid, let refineSize = plan.refineSize, let tile = plan.tileSize {
            let refined = resize(img, height: refineSize[0], width: refineSize[1])
            refine = refined
            for r in 0..<grid[0] {
                for c in 0..<grid[1] {
                    slices.append(
                        try Patches.slice(
                            refined.rgb, imageWidth: refined.width, x0: c * tile[1], y0: r * tile[0], width: tile[1],
                            height: tile[0], table: table, patchSize: p, mode: cfg.downsampleMode,
                            numPatchesPerSide: cfg.numPatchesPerSide))
                }
            }
        }
        return PreparedImage(plan: plan, source: source, refine: refine, slices: slices)
    }
}

/// Natural log rounded correctly to float64. The grid choice compares |log(w/h) - log(cols/rows)|
/// between candidates, and exact mathematical ties (a 3:1 image between 1x6 and 2x3, say) are
/// decided by the last bit of each log; the reference's libm (glibc) is correctly rounded on every
/// argument that takes part in such a tie, while other platforms' `log` need not be (Apple's libm
/// is not documented to be). So the log is computed in double-double arithmetic (about 100 bits)
/// and rounded once, as the HarmonyOS app does.
enum CorrectlyRoundedLog {
    struct DD {
        var hi: Double
        var lo: Double
    }

    static let ln2Hi = 0.6931471805599453
    static let ln2Lo = 2.3190468138462996e-17

    static func quickTwoSum(_ a: Double, _ b: Double) -> DD {
        let s = a + b
        return DD(hi: s, lo: b - (s - a))
    }

    static func twoSum(_ a: Double, _ b: Double) -> DD {
        let s = a + b
        let bb = s - a
        return DD(hi: s, lo: (a - (s - bb)) + (b - bb))
    }

    static func twoProd(_ a: Double, _ b: Double) -> DD {
        let p = a * b
        return DD(hi: p, lo: (-p).addingProduct(a, b))  // one fused multiply-add: the exact error of a * b
    }

    static func add(_ x: DD, _ y: DD) -> DD {
        let s = twoSum(x.hi, y.hi)
        let t = twoSum(x.lo, y.lo)
        let u = quickTwoSum(s.hi, s.lo + t.hi)
        return quickTwoSum(u.hi, u.lo + t.lo)
    }

    static func mul(_ x: DD, _ y: DD) -> DD {
        let p = twoProd(x.hi, y.hi)
        return quickTwoSum(p.hi, p.lo + (x.hi * y.lo + x.lo * y.hi))
    }

    static func mul(_ x: DD, _ b: Double) -> DD {
        let p = twoProd(x.hi, b)
        return quickTwoSum(p.hi, p.lo + x.lo * b)
    }

    static func div(_ x: DD, _ y: DD) -> DD {
        let q1 = x.hi / y.hi
        let r1 = add(x, mul(y, -q1))
        let q2 = r1.hi / y.hi
        let r2 = add(r1, mul(y, -q2))
        let q3 = r2.hi / y.hi
        return add(quickTwoSum(q1, q2), DD(hi: q3, lo: 0))
    }

    /// log(x) for finite x > 0, correctly rounded except within ~2^-100 of a rounding midpoint.
    static func log(_ x: Double) -> Double {
        guard x > 0, x.isFinite else {
            return Foundation.log(x)
        }
        // x = 2^k * m, m in [sqrt(1/2), sqrt(2)]
        var k = Int(x.exponent)
        var m = x.significand  // in [1, 2)
        if m > 2.0.squareRoot() {
            m /= 2
            k += 1
        }
        // log(m) = 2 atanh(s), s = (m - 1) / (m + 1): sum s^(2i+1) / (2i+1)
        let s = div(DD(hi: m - 1, lo: 0), twoSum(m, 1))
        let s2 = mul(s, s)
        var term = s
        var sum = s
        var i = 1
        while i < 40 && term.hi != 0 {
            term = mul(term, s2)
            let t = div(term, DD(hi: Double(2 * i + 1), lo: 0))
            if abs(t.hi) < abs(sum.hi) * 1e-36 {
                break
            }
            sum = add(sum, t)
            i += 1
        }
        let logM = DD(hi: 2 * sum.hi, lo: 2 * sum.lo)
        let kLn2 = add(twoProd(Double(k), ln2Hi), DD(hi: Double(k) * ln2Lo, lo: 0))
        let r = add(kLn2, logM)
        return r.hi + r.lo
    }
}
