/// Bicubic resize of interleaved uint8 RGB, bit-exact with Pillow's `Image.resize(size, BICUBIC)`
/// (the filter of edge_runtime/processing/image.py `resize`), ported from the HarmonyOS app's
/// ImageResize.ets.
///
/// Pillow's separable two-pass resample (libImaging/Resample.c):
/// - per output coordinate, a window of input samples centred on `(i + 0.5) * scale`, the cubic
///   kernel (a = -0.5, support 2) stretched by `max(scale, 1)` when downscaling, clipped at the
///   image edges and normalised to sum 1 (in float64);
/// - the weights become 22-bit fixed point (round half away from zero); each output sample is
///   `(2^21 + sum(v * w)) >> 22` clamped to [0, 255];
/// - two passes with a uint8 intermediate; a pass whose size does not change is skipped. The order
///   is Pillow 13.0's: vertical first when the height shrinks by more than twice as many pixels as
///   the width (`dH > 0 && dH > 2 * dW`), else horizontal first (then only over the input rows the
///   vertical pass reads). The order changes results by up to a level, and the kit follows 13.0.
enum BicubicResize {
    static let precisionBits = 22
    static let fixedOne = Double(1 << 22)
    static let fixedHalf = 1 << 21

    /// Fixed-point weights of one pass: per output sample a window [start, start + count) of inputs.
    struct Coefficients {
        let ksize: Int
        var starts: [Int]
        var counts: [Int]
        var weights: [Int]
    }

    /// Keys' cubic convolution kernel with a = -0.5, in Pillow's float64 operation order.
    static func kernel(_ x0: Double) -> Double {
        let a = -0.5
        let x = x0 < 0 ? -x0 : x0
        if x < 1.0 {
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        }
        if x < 2.0 {
            return (((x - 5) * x + 8) * x - 4) * a
        }
        return 0.0
    }

    static func coefficients(inSize: Int, outSize: Int) -> Coefficients {
        let scale = Double(inSize) / Double(outSize)
        let filterScale = scale < 1.0 ? 1.0 : scale
        let support = 2.0 * filterScale
        let ksize = Int(support.rounded(.up)) * 2 + 1
        var c = Coefficients(
            ksize: ksize, starts: [Int](repeating: 0, count: outSize),
            counts: [Int](repeating: 0, count: outSize), weights: [Int](repeating: 0, count: outSize * ksize))
        var window = [Double](repeating: 0, count: ksize)
        let invFilterScale = 1.0 / filterScale
        for xx in 0..<outSize {
            let center = (Double(xx) + 0.5) * scale
            let xmin = max(Int(center - support + 0.5), 0)  // Int() truncates toward zero, as C's (int)
            let xmax = min(Int(center + support + 0.5), inSize) - xmin
            var total = 0.0
            for x in 0..<max(xmax, 0) {
                let w = kernel((Double(x + xmin) - center + 0.5) * invFilterScale)
                window[x] = w
                total += w
            }
            for x in 0..<max(xmax, 0) {
                let w = total != 0.0 ? window[x] / total : window[x]
                c.weights[xx * ksize + x] = w < 0 ? Int(-0.5 + w * fixedOne) : Int(0.5 + w * fixedOne)
            }
            c.starts[xx] = xmin
            c.counts[xx] = max(xmax, 0)
        }
        return c
    }

    @inline(__always)
    static func clip8(_ acc: Int) -> UInt8 {
        let v = acc >> precisionBits
        return v < 0 ? 0 : (v > 255 ? 255 : UInt8(v))
    }

    /// Rows [rowStart, rowStart + rows) of `src` (width srcW) to width dstW: [rows, dstW, 3].
    static func horizontal(_ src: [UInt8], srcW: Int, rowStart: Int, rows: Int, dstW: Int, _ c: Coefficients)
        -> [UInt8]
    {
        var out = [UInt8](repeating: 0, count: rows * dstW * 3)
        src.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBufferPointer { o in
                for y in 0..<rows {
                    let inRow = (y + rowStart) * srcW * 3
                    let outRow = y * dstW * 3
                    for xx in 0..<dstW {
                        let kb = xx * c.ksize
                        var s0 = fixedHalf
                        var s1 = fixedHalf
                        var s2 = fixedHalf
                        var p = inRow + c.starts[xx] * 3
                        for x in 0..<c.counts[xx] {
                            let w = c.weights[kb + x]
                            s0 += Int(s[p]) * w
                            s1 += Int(s[p + 1]) * w
                            s2 += Int(s[p + 2]) * w
                            p += 3
                        }
                        let q = outRow + xx * 3
                        o[q] = clip8(s0)
                        o[q + 1] = clip8(s1)
                        o[q + 2] = clip8(s2)
                    }
                }
            }
        }
        return out
    }

    /// `src` is [.., width, 3] whose row 0 is input row `rowOffset`; returns [dstH, width, 3].
    static func vertical(_ src: [UInt8], width: Int, rowOffset: Int, dstH: Int, _ c: Coefficients) -> [UInt8] {
        let stride = width * 3
        var out = [UInt8](repeating: 0, count: dstH * stride)
        var acc = [Int](repeating: 0, count: stride)
        src.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBufferPointer { o in
                acc.withUnsafeMutableBufferPointer { a in
                    for yy in 0..<dstH {
                        let ymin = c.starts[yy] - rowOffset
                        let kb = yy * c.ksize
                        for i in 0..<stride { a[i] = fixedHalf }
                        for y in 0..<c.counts[yy] {
                            let w = c.weights[kb + y]
                            let row = (ymin + y) * stride
                            for i in 0..<stride { a[i] += Int(s[row + i]) * w }
                        }
                        let outRow = yy * stride
                        for i in 0..<stride { o[outRow + i] = clip8(a[i]) }
                    }
                }
            }
        }
        return out
    }

    /// Resize [srcH, srcW, 3] to [dstH, dstW, 3] like Pillow's BICUBIC (a copy when the size is unchanged).
    static func resize(_ src: [UInt8], srcW: Int, srcH: Int, dstW: Int, dstH: Int) -> [UInt8] {
        precondition(srcW >= 1 && srcH >= 1 && dstW >= 1 && dstH >= 1, "resize: bad sizes")
        precondition(src.count == srcW * srcH * 3, "resize: \(src.count) bytes for a \(srcW)x\(srcH) RGB image")
        let needH = dstW != srcW
        let needV = dstH != srcH
        if !needH && !needV {
            return src
        }
        let vert = coefficients(inSize: srcH, outSize: dstH)
        let shrinkH = srcH - dstH
        let horizontalFirst = !(shrinkH > 0 && shrinkH > (srcW - dstW) * 2)
        if !horizontalFirst {
            let stage = vertical(src, width: srcW, rowOffset: 0, dstH: dstH, vert)
            if !needH {
                return stage
            }
            return horizontal(
                stage, srcW: srcW, rowStart: 0, rows: dstH, dstW: dstW, coefficients(inSize: srcW, outSize: dstW))
        }
        let firstRow = vert.starts[0]
        let lastRow = vert.starts[dstH - 1] + vert.counts[dstH - 1]
        var stage = src
        var rowOffset = 0
        if needH {
            stage = horizontal(
                src, srcW: srcW, rowStart: firstRow, rows: lastRow - firstRow, dstW: dstW,
                coefficients(inSize: srcW, outSize: dstW))
            rowOffset = firstRow
        }
        if !needV {
            return stage
        }
        return vertical(stage, width: dstW, rowOffset: rowOffset, dstH: dstH, vert)
    }
}
