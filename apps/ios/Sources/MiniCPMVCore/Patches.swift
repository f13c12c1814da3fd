/// The vision graph's input for one slice, as edge_runtime/processing/patches.py and image.py
/// `normalize`: PxP patches of the normalised slice in window-major order, and their position ids.

/// How many patches per side merge into one LLM token: "16x" merges 4x4 patches, "4x" 2x2.
public enum DownsampleMode: String, Sendable, CaseIterable {
    case x16 = "16x"
    case x4 = "4x"

    public init(parsing text: String) throws {
        guard let mode = DownsampleMode(rawValue: text) else {
            throw CoreError.invalid("downsample_mode must be \"16x\" or \"4x\", got \"\(text)\"")
        }
        self = mode
    }

    /// Patches per side merged into one LLM token.
    public var mergeFactor: Int { self == .x16 ? 4 : 2 }
    /// Patches per LLM token.
    public var tokenDivisor: Int { mergeFactor * mergeFactor }
}

/// Errors of the core: bad input or settings, with one clear message.
public enum CoreError: Error, CustomStringConvertible, Equatable {
    case invalid(String)

    public var description: String {
        switch self {
        case .invalid(let message): return message
        }
    }
}

enum Patches {
    /// float32 [3 * 256]: `((level * rescale) - mean[c]) / std[c]` per uint8 level, in the reference's
    /// precisions: level * rescale in float64 rounded to float32, then subtract and divide in float32.
    static func normalizationTable(mean: [Double], std: [Double], rescale: Double) -> [Float] {
        var table = [Float](repeating: 0, count: 3 * 256)
        for c in 0..<3 {
            let m = Float(mean[c])
            let s = Float(std[c])
            for v in 0..<256 {
                let level = Float(Double(v) * rescale)
                table[c * 256 + v] = (level - m) / s
            }
        }
        return table
    }

    /// The row-major patch index at each window-major position. "16x": each 4x4 block of patches is
    /// four 2x2 windows, blocks then windows then patches row-major; "4x": 2x2 windows.
    static func windowOrder(h: Int, w: Int, mode: DownsampleMode) throws -> [Int] {
        let m = mode.mergeFactor
        guard h >= 1, w >= 1, h % m == 0, w % m == 0 else {
            throw CoreError.invalid(
                "slice patch grid \(h)x\(w) is not a positive multiple of \(m) per side, as \"\(mode.rawValue)\" mode needs"
            )
        }
        var order = [Int]()
        order.reserveCapacity(h * w)
        if mode == .x16 {
            for br in 0..<(h / 4) {
                for bc in 0..<(w / 4) {
                    for sr in 0..<2 {
                        for sc in 0..<2 {
                            for r in 0..<2 {
                                for c in 0..<2 {
                                    order.append((br * 4 + sr * 2 + r) * w + (bc * 4 + sc * 2 + c))
                                }
                            }
                        }
                    }
                }
            }
            return order
        }
        for wr in 0..<(h / 2) {
            for wc in 0..<(w / 2) {
                for r in 0..<2 {
                    for c in 0..<2 {
                        order.append((wr * 2 + r) * w + (wc * 2 + c))
                    }
                }
            }
        }
        return order
    }

    /// float32 boundaries of `torch.arange(1/n, 1.0, 1/n, dtype=float32)` on CPU, element for
    /// element: the count is ceil((1 - 1/n) / (1/n)) in float64; torch fills 16 elements at a time
    /// with two 8-wide vectors (`base = f32(start + step * i0)`, element j = `f32(base + j * step)` in
    /// float64) and the tail element by element (`f32(start + step * i)`).
    static func positionBoundaries(_ n: Int) -> [Float] {
        let start = 1.0 / Double(n)
        let step = 1.0 / Double(n)
        let count = Int(((1.0 - start) / step).rounded(.up))
        var out = [Float](repeating: 0, count: max(count, 0))
        let vec = 8
        let bulk = (count / (2 * vec)) * (2 * vec)
        var i0 = 0
        while i0 < bulk {
            let base = Double(Float(start + step * Double(i0)))
            for j in 0..<vec {
                out[i0 + j] = Float(base + Double(j) * step)
            }
            i0 += vec
        }
        if bulk < count {
            for i in bulk..<count {
                out[i] = Float(start + step * Double(i))
            }
        }
        return out
    }

    /// `bucketize(arange(size) / size, boundaries, right=True)` per coordinate (float32 values).
    static func buckets(_ size: Int, _ boundaries: [Float]) -> [Int] {
        var out = [Int](repeating: 0, count: size)
        var b = 0
        for i in 0..<size {
            let v = Float(Double(i) / Double(size))
            while b < boundaries.count && boundaries[b] <= v {
                b += 1
            }
            out[i] = b
        }
        return out
    }

    /// Row-major ids into the n*n position table.
    static func rowMajorPositionIds(h: Int, w: Int, n: Int) -> [Int] {
        let boundaries = positionBoundaries(n)
        let rows = buckets(h, boundaries)
        let cols = buckets(w, boundaries)
        var ids = [Int](repeating: 0, count: h * w)
        for r in 0..<h {
            for c in 0..<w {
                ids[r * w + c] = rows[r] * n + cols[c]
            }
        }
        return ids
    }

    /// Cut the region (x0, y0, width, height) of the RGB image `rgb` (row stride imageWidth pixels)
    /// into normalised patches in window-major order, with their position ids.
    static func slice(
        _ rgb: [UInt8], imageWidth: Int, x0: Int, y0: Int, width: Int, height: Int, table: [Float],
        patchSize p: Int, mode: DownsampleMode, numPatchesPerSide: Int
    ) throws -> SlicePatches {
        guard width % p == 0, height % p == 0 else {
            throw CoreError.invalid("slice \(height)x\(width) px is not a multiple of the \(p)-px patch")
        }
        let h = height / p
        let w = width / p
        let order = try windowOrder(h: h, w: w, mode: mode)
        let rowIds = rowMajorPositionIds(h: h, w: w, n: numPatchesPerSide)
        let count = h * w
        let pp = p * p
        let dim = 3 * pp
        var patches = [Float](repeating: 0, count: count * dim)
        var ids = [Int64](repeating: 0, count: count)
        let stride = imageWidth * 3
        patches.withUnsafeMutableBufferPointer { out in
            rgb.withUnsafeBufferPointer { px in
                table.withUnsafeBufferPointer { t in
                    for k in 0..<count {
                        let idx = order[k]
                        ids[k] = Int64(rowIds[idx])
                        let pr = idx / w
                        let pc = idx - pr * w
                        let px0 = x0 + pc * p
                        let py0 = y0 + pr * p
                        let rowBase = k * dim
                        for y in 0..<p {
                            var src = (py0 + y) * stride + px0 * 3
                            var dst = rowBase + y * p
                            for _ in 0..<p {
                                out[dst] = t[Int(px[src])]
                                out[dst + pp] = t[256 + Int(px[src + 1])]
                                out[dst + 2 * pp] = t[512 + Int(px[src + 2])]
                                src += 3
                                dst += 1
                            }
                        }
                    }
                }
            }
        }
        return SlicePatches(patches: patches, positionIds: ids, patchGrid: [h, w], tokens: count / mode.tokenDivisor)
    }
}

/// One slice ready for the vision graph.
public struct SlicePatches: Sendable {
    /// float32 [L, 3*P*P], window-major rows, each (channel, y, x).
    public let patches: [Float]
    /// int64 [L], same order.
    public let positionIds: [Int64]
    /// [h, w] in patches.
    public let patchGrid: [Int]
    /// LLM tokens: h*w / 16 ("16x") or / 4 ("4x").
    public let tokens: Int
}
