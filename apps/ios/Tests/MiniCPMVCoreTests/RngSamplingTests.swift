import XCTest

@testable import MiniCPMVCore

/// The kit's SplitMix64 vectors and sampling cases (docs/conformance.md "rng", "sampling[]").
final class RngSamplingTests: XCTestCase {
    func testEveryRngVector() throws {
        let kit = try Kit.load()
        let rng = try kit.index.object("rng")
        XCTAssertEqual(try rng.string("algorithm"), "splitmix64")
        let vectors = try rng.objects("vectors")
        XCTAssertFalse(vectors.isEmpty)
        for v in vectors {
            let seed = try XCTUnwrap(UInt64(try v.string("seed")), "seed of \(v.path)")
            var g = SplitMix64(seed: seed)
            XCTAssertEqual(
                try v.strings("u64").map { UInt64($0) }, (0..<8).map { _ in g.nextU64() }, "u64 of seed \(seed)")
            var h = SplitMix64(seed: seed)
            let want = try v.doubles("random")
            XCTAssertEqual(want, (0..<want.count).map { _ in h.random() }, "random() of seed \(seed)")  // exact
        }
        print("[ios-core] rng: \(vectors.count) vectors")
    }

    func testDocumentedOutputs() {
        var g = SplitMix64(seed: 1_234_567)
        XCTAssertEqual(
            [g.nextU64(), g.nextU64(), g.nextU64()],
            [6_457_827_717_110_365_317, 3_203_168_211_198_807_973, 9_817_491_932_198_370_423])
        var z = SplitMix64(seed: 0)
        XCTAssertEqual(
            [z.nextU64(), z.nextU64(), z.nextU64()],
            [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F])
    }

    func testEverySamplingCase() throws {
        let kit = try Kit.load()
        let cases = try kit.index.objects("sampling")
        XCTAssertGreaterThanOrEqual(cases.count, 8)
        for c in cases {
            let name = try c.string("name")
            var cfg = SamplingConfig()
            cfg.temperature = try c.double("temperature")
            cfg.topK = try c.int("top_k")
            cfg.topP = try c.double("top_p")
            cfg.repetitionPenalty = try c.double("repetition_penalty")
            cfg.seed = try XCTUnwrap(UInt64(try c.string("seed")))
            let want = try c.ints("tokens")
            cfg.maxNewTokens = max(want.count, 1)
            let logits = try kit.f32(kit.ref(c, "logits"))
            var sampler = try Sampler(config: cfg, promptIds: try c.ints("seen_ids"))
            var got = [Int]()
            var uniforms = [Double]()
            var firstProbs: [Double]?
            for _ in want {
                got.append(try sampler.next(logits))
                if let u = sampler.lastUniform, !cfg.greedy { uniforms.append(u) }
                if firstProbs == nil { firstProbs = sampler.lastProbs }
            }
            XCTAssertEqual(got, want, "tokens of sampling case \(name)")
            XCTAssertEqual(uniforms, try c.doubles("uniforms"), "uniforms of sampling case \(name)")
            if c.has("first_probs") {
                let r = try kit.ref(c, "first_probs")
                let probs = try XCTUnwrap(firstProbs, "first draw's probabilities of \(name)")
                XCTAssertLessThanOrEqual(maxAbsDiff(probs, try kit.f64(r)), r.atol, "first_probs of \(name)")
            } else {
                XCTAssertTrue(cfg.greedy, "\(name) has no first_probs but is not greedy")
            }
        }
        print("[ios-core] sampling: \(cases.count) cases")
    }

    func testSamplerRefusesBadSettings() {
        var cfg = SamplingConfig()
        cfg.topP = 0
        cfg.temperature = -1
        XCTAssertThrowsError(try Sampler(config: cfg)) { error in
            XCTAssertTrue("\(error)".contains("topP") && "\(error)".contains("temperature"), "\(error)")
        }
        var sampler = try! Sampler(config: SamplingConfig())
        XCTAssertThrowsError(try sampler.next([0, .nan]))
    }
}
