import XCTest

@testable import MiniCPMVCore

/// The kit's image cases and generation images: plan and resized views exact, patches within
/// atol, position ids exact; and the EXIF case.
final class ImageTests: XCTestCase {
    /// Checks one image laid out like an image case; returns the number of slices checked.
    static func check(_ kit: Kit, _ image: JSONObject, _ label: String) throws -> Int {
        let mode = try DownsampleMode(parsing: image.string("downsample_mode"))
        let cfg = try kit.sliceConfig.with(downsampleMode: mode, maxSliceNums: image.int("max_slice_nums"))
        let px = try kit.pixels(image)
        let prepared = try Slicing.preprocess(px, config: cfg)
        let plan = try image.object("plan")
        let p = prepared.plan
        XCTAssertEqual(p.imageSize, try plan.ints("image_size"), "\(label) image_size")
        XCTAssertEqual(p.sourceSize, try plan.ints("source_size"), "\(label) source_size")
        XCTAssertEqual(p.grid, plan.has("grid") ? try plan.ints("grid") : nil, "\(label) grid")
        XCTAssertEqual(
            p.refineSize, plan.has("refine_size") ? try plan.ints("refine_size") : nil, "\(label) refine_size")
        XCTAssertEqual(p.tileSize, plan.has("tile_size") ? try plan.ints("tile_size") : nil, "\(label) tile_size")
        XCTAssertEqual(p.nSlices, try plan.int("n_slices"), "\(label) n_slices")
        XCTAssertEqual(
            p.sliceSizes, try plan.array("slice_sizes").map { try JSONObject(["v": $0], label).ints("v") },
            "\(label) slice_sizes")
        XCTAssertEqual(
            p.patchGrids, try plan.array("patch_grids").map { try JSONObject(["v": $0], label).ints("v") },
            "\(label) patch_grids")
        XCTAssertEqual(p.tokenCounts, try plan.ints("token_counts"), "\(label) token_counts")
        XCTAssertEqual(p.numTokens, try plan.int("num_tokens"), "\(label) num_tokens")

        let resized = try image.object("resized")
        XCTAssertTrue(
            prepared.source.rgb == (try kit.u8(kit.ref(resized, "source"))), "\(label) resized source (exact)")
        if resized.has("refine") {
            let refine = try XCTUnwrap(prepared.refine, "\(label) has a refined image")
            XCTAssertTrue(refine.rgb == (try kit.u8(kit.ref(resized, "refine"))), "\(label) resized refine (exact)")
        } else {
            XCTAssertNil(prepared.refine, "\(label) is not sliced")
        }
        let slices = try image.objects("slices")
        XCTAssertEqual(prepared.slices.count, slices.count, "\(label) slice count")
        for (i, s) in slices.enumerated() where i < prepared.slices.count {
            let got = prepared.slices[i]
            XCTAssertEqual(try s.int("index"), i)
            XCTAssertEqual(got.patchGrid, try s.ints("patch_grid"), "\(label) slice \(i) patch_grid")
            XCTAssertEqual(got.tokens, try s.int("tokens"), "\(label) slice \(i) tokens")
            let pr = try kit.ref(s, "patches")
            XCTAssertEqual(pr.shape, [got.patchGrid[0] * got.patchGrid[1], 3 * cfg.patchSize * cfg.patchSize])
            let diff = maxAbsDiff(got.patches, try kit.f32(pr))
            XCTAssertLessThanOrEqual(diff, pr.atol, "\(label) slice \(i) patches")
            XCTAssertEqual(got.positionIds, try kit.i64(kit.ref(s, "position_ids")), "\(label) slice \(i) position ids")
        }
        return slices.count
    }

    func testEveryImageCase() throws {
        let kit = try Kit.load()
        let cases = try kit.index.objects("images")
        XCTAssertGreaterThanOrEqual(cases.count, 8)
        var slices = 0
        for c in cases {
            slices += try ImageTests.check(kit, c, "image case \(try c.string("name"))")
        }
        print("[ios-core] images: \(cases.count) cases, \(slices) slices")
    }

    func testEveryGenerationImage() throws {
        let kit = try Kit.load()
        let runs = try kit.index.objects("generations")
        var n = 0
        for g in runs where g.has("image") {
            _ = try ImageTests.check(kit, g.object("image"), "generation \(try g.string("name")) image")
            n += 1
        }
        XCTAssertGreaterThan(n, 0)
        print("[ios-core] generation images: \(n)")
    }

    func testGridTiesUseCorrectlyRoundedLogs() {
        // exact ties between grids are decided by the last bit of log(); these are glibc's values
        for x in [3.0, 1.0 / 3.0, 2.0, 0.5, 6.0, 1.5, 2.0 / 3.0, 10.0, 0.1] {
            XCTAssertEqual(CorrectlyRoundedLog.log(x), Foundation.log(x), "log(\(x))")
        }
        // a 3:1 image three times the scale area is cut into one row of three tiles
        XCTAssertEqual(Slicing.slicedGrid(height: 100, width: 300, maxSliceNums: 9, scaleResolution: 100), [1, 3])
    }

    func testExifCase() throws {
        let kit = try Kit.load()
        let exif = try XCTUnwrap(
            try kit.index.objects("images").first { $0.has("encoded_file") }, "the kit has an EXIF case")
        let jpeg = [UInt8](try Data(contentsOf: kit.root.appendingPathComponent(exif.string("encoded_file"))))
        XCTAssertEqual(Exif.jpegOrientation(jpeg), 6)
        let upright = try kit.pixels(exif)
        let stored = try XCTUnwrap(Exif.jpegSize(jpeg))
        // Orientation 6 swaps the sides: stored [h, w] is upright [w, h]
        XCTAssertEqual(stored, [upright.width, upright.height])
        // the stored (sensor) image is upright rotated back (8 undoes 6); applying 6 gives upright again
        let sensor = Exif.applyOrientation(upright, 8)
        XCTAssertEqual([sensor.height, sensor.width], stored)
        XCTAssertEqual(Exif.applyOrientation(sensor, 6), upright)
    }

    func testAllEightOrientations() throws {
        // 3 wide x 2 high, pixel value = index
        let img = try ImagePixels(width: 3, height: 2, rgb: (0..<6).flatMap { [UInt8($0), 0, 0] })
        func red(_ p: ImagePixels) -> [[Int]] {
            (0..<p.height).map { y in (0..<p.width).map { x in Int(p.rgb[(y * p.width + x) * 3]) } }
        }
        let want: [Int: [[Int]]] = [
            1: [[0, 1, 2], [3, 4, 5]], 2: [[2, 1, 0], [5, 4, 3]], 3: [[5, 4, 3], [2, 1, 0]],
            4: [[3, 4, 5], [0, 1, 2]],
            5: [[0, 3], [1, 4], [2, 5]], 6: [[3, 0], [4, 1], [5, 2]], 7: [[5, 2], [4, 1], [3, 0]],
            8: [[2, 5], [1, 4], [0, 3]],
        ]
        for (o, grid) in want {
            XCTAssertEqual(red(Exif.applyOrientation(img, o)), grid, "orientation \(o)")
        }
        XCTAssertEqual(Exif.applyOrientation(img, 9), img)
    }

    func testOrientationFromSyntheticJpegs() {
        for little in [true, false] {
            for o in 1...8 {
                XCTAssertEqual(
                    Exif.jpegOrientation(ImageTests.jpeg(o, little: little)), o, "orientation \(o) little \(little)")
            }
            XCTAssertEqual(Exif.jpegOrientation(ImageTests.jpeg(9, little: little)), 0)
            XCTAssertEqual(Exif.jpegOrientation(ImageTests.jpeg(nil, little: little)), 0)
        }
        XCTAssertEqual(Exif.jpegOrientation([0x89, 0x50, 0x4E, 0x47]), 0)
        XCTAssertEqual(Exif.jpegSize(ImageTests.jpeg(1, little: true)), [2, 3])
    }

    /// SOI, APP1 Exif with IFD0 {ResolutionUnit, Orientation?}, SOF0 (2 high, 3 wide), SOS.
    static func jpeg(_ orientation: Int?, little: Bool) -> [UInt8] {
        var tiff = [UInt8]()
        func u16(_ v: Int) { tiff += little ? [UInt8(v & 0xFF), UInt8(v >> 8)] : [UInt8(v >> 8), UInt8(v & 0xFF)] }
        func u32(_ v: Int) {
            if little { u16(v & 0xFFFF); u16(v >> 16) } else { u16(v >> 16); u16(v & 0xFFFF) }
        }
        tiff += little ? [0x49, 0x49] : [0x4D, 0x4D]
        u16(42)
        u32(8)
        u16(orientation == nil ? 1 : 2)
        u16(0x0128); u16(3); u32(1); u16(2); u16(0)
        if let orientation { u16(0x0112); u16(3); u32(1); u16(orientation); u16(0) }
        u32(0)
        let len = 2 + 6 + tiff.count
        var bytes: [UInt8] = [0xFF, 0xD8, 0xFF, 0xE1, UInt8(len >> 8), UInt8(len & 0xFF), 0x45, 0x78, 0x69, 0x66, 0, 0]
        bytes += tiff
        bytes += [0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00, 0x02, 0x00, 0x03, 0x01, 0x01, 0x11, 0x00]
        bytes += [0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00]
        return bytes
    }
}
